import Foundation
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Installs, lists and removes backup schedules as systemd units (`BackupSchedule`), with their
/// credentials files (root only) under the configuration directory.
public struct BackupScheduleInstaller: Sendable {
    public let unitDirectory: String
    public let configurationDirectory: String

    public init(unitDirectory: String = "/etc/systemd/system", configurationDirectory: String = "/etc/keel") {
        self.unitDirectory = unitDirectory
        self.configurationDirectory = configurationDirectory
    }

    func timerPath(_ unit: String) -> String { "\(unitDirectory)/\(unit).timer" }
    func servicePath(_ unit: String) -> String { "\(unitDirectory)/\(unit).service" }
    func credentialPath(_ unit: String) -> String { BackupSchedule.credentialFile(directory: configurationDirectory, unit: unit) }

    /// Writes the units (and the credentials file, mode 0600, when given) and starts the timer;
    /// on failure nothing of it stays.
    public func install(_ schedule: BackupSchedule, credentials: String?) throws {
        let unit = schedule.unit
        guard access(timerPath(unit), F_OK) != 0 else {
            throw DaemonError("schedule \(schedule.name) of \(schedule.volume) exists; remove it first (keel backup schedule rm \(schedule.volume) --name \(schedule.name))")
        }
        do {
            if let credentials {
                try makeDirectories("\(configurationDirectory)/credentials", mode: 0o700)
                try writeFileAtomically(credentialPath(unit), credentials, mode: 0o600)
            }
            try writeFileAtomically(servicePath(unit), schedule.serviceUnit(configurationDirectory: configurationDirectory))
            try writeFileAtomically(timerPath(unit), schedule.timerUnit)
            try systemctl("daemon-reload")
            try systemctl("enable", "--now", unit + ".timer")
        } catch {
            removeFiles(unit)
            _ = try? systemctl("daemon-reload")
            throw error
        }
    }

    /// Stops and removes the schedule's timer, service and credentials; false when there is no such schedule.
    public func remove(volume: String, name: String) throws -> Bool {
        let unit = "keel-backup:\(volume):\(name)"
        guard access(timerPath(unit), F_OK) == 0 else { return false }
        if systemdIsRunning() {
            try systemctl("disable", "--now", unit + ".timer")
            _ = try? systemctl("stop", unit + ".service")
        }
        removeFiles(unit)
        if systemdIsRunning() { try systemctl("daemon-reload") }
        return true
    }

    /// The schedules whose timers are installed, by volume then name.
    public func list(executable: String) -> [BackupSchedule] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: unitDirectory)) ?? []
        return names.filter { $0.hasPrefix("keel-backup:") && $0.hasSuffix(".timer") }.sorted().compactMap { name in
            guard let text = try? String(contentsOfFile: "\(unitDirectory)/\(name)", encoding: .utf8) else { return nil }
            return BackupSchedule.parse(timerUnit: text, executable: executable)
        }
    }

    /// What systemd says of the schedule's timer: active or not, and its last result.
    public func state(of schedule: BackupSchedule) -> (active: String, lastResult: String)? {
        guard systemdIsRunning(),
              let timer = try? runToCompletion(["systemctl", "is-active", schedule.unit + ".timer"]),
              let result = try? runToCompletion(["systemctl", "show", "-p", "Result", "--value", schedule.unit + ".service"]) else {
            return nil
        }
        return (timer.output.trimmingCharacters(in: .whitespacesAndNewlines), result.output.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Whether systemd accepts the calendar event, or its one-line reason.
    public static func calendarProblem(_ spec: String) -> String? {
        guard let result = try? runToCompletion(["systemd-analyze", "calendar", spec]) else { return nil }
        guard result.status != 0 else { return nil }
        return result.output.split(separator: "\n").first.map(String.init) ?? "systemd-analyze refused it"
    }

    private func removeFiles(_ unit: String) {
        for path in [timerPath(unit), servicePath(unit), credentialPath(unit)] { unlink(path) }
    }
}
