import Foundation

/// A recurring backup of one volume: a systemd timer and the oneshot service it starts, which runs
/// `keel backup create VOL --schedule NAME --keep N`. The units are the record of the schedule (its
/// `[X-Keel]` section, which systemd ignores); S3 credentials live in a root-only file the service
/// loads with `LoadCredential=`, never in a unit.
public struct BackupSchedule: Equatable, Sendable {
    public enum Timing: Equatable, Sendable {
        /// Every so many seconds, from when the timer starts.
        case every(seconds: Int)
        /// A systemd calendar event (`OnCalendar=`), e.g. `daily` or `*-*-* 02:30`.
        case calendar(String)
    }

    public var volume: String
    public var name: String
    public var target: String
    public var timing: Timing
    public var keep: Int
    public var stateDirectory: String
    /// The keel binary the service runs.
    public var executable: String
    /// Non-secret S3 settings the service gets in its environment (region, endpoint URL).
    public var environment: [String: String] = [:]
    /// Whether the service loads an S3 credentials file (`credentialFile`) as credential `aws`, which
    /// keel reads from `$CREDENTIALS_DIRECTORY/aws`.
    public var loadsCredentials = false

    public init(volume: String, name: String, target: String, timing: Timing, keep: Int, stateDirectory: String, executable: String) {
        self.volume = volume
        self.name = name
        self.target = target
        self.timing = timing
        self.keep = keep
        self.stateDirectory = stateDirectory
        self.executable = executable
    }

    /// `keel-backup:VOL:NAME`: ':' is in no volume or schedule name, so the name parses back.
    public var unit: String { "keel-backup:\(volume):\(name)" }

    public static func credentialFile(directory: String, unit: String) -> String { "\(directory)/credentials/\(unit)" }

    /// `--every`'s text: 90s, 15m, 1h, 1d (a count of seconds, minutes, hours or days).
    public static func parseInterval(_ text: String) -> Int? {
        let units: [Character: Int] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        guard let unit = text.last.flatMap({ units[$0] }), let count = Int(text.dropLast()), count > 0, count <= 366 * 86400 / unit else {
            return nil
        }
        return count * unit
    }

    public static func intervalText(_ seconds: Int) -> String {
        for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60)] where seconds % size == 0 { return "\(seconds / size)\(unit)" }
        return "\(seconds)s"
    }

    var createArguments: [String] {
        [executable, "backup", "create", volume, "--target", target, "--schedule", name, "--keep", "\(keep)",
         "--state-dir", stateDirectory]
    }

    public var timerUnit: String {
        var timer: [String]
        var recorded: [String]
        switch timing {
        case .every(let seconds):
            // Accurate to a tenth of the interval (at most a minute): a short test interval fires on time.
            timer = ["OnActiveSec=\(seconds)s", "OnUnitActiveSec=\(seconds)s", "AccuracySec=\(max(1, min(60, seconds / 10)))s"]
            recorded = ["Every=\(Self.intervalText(seconds))"]
        case .calendar(let spec):
            timer = ["OnCalendar=\(spec)", "Persistent=true", "AccuracySec=1min"]
            recorded = ["OnCalendar=\(spec)"]
        }
        return """
            # Made by keel backup schedule; remove it with: keel backup schedule rm \(volume) --name \(name)
            [Unit]
            Description=Keel backup schedule \(name) of volume \(volume)

            [Timer]
            \(timer.joined(separator: "\n"))

            [Install]
            WantedBy=timers.target

            [X-Keel]
            Volume=\(volume)
            Schedule=\(name)
            Target=\(target)
            \(recorded.joined(separator: "\n"))
            Keep=\(keep)
            StateDirectory=\(stateDirectory)

            """
    }

    public func serviceUnit(configurationDirectory: String) -> String {
        var lines = [
            "# Made by keel backup schedule; remove it with: keel backup schedule rm \(volume) --name \(name)",
            "[Unit]",
            "Description=Keel backup of volume \(volume) to \(target.replacingOccurrences(of: "%", with: "%%")) (schedule \(name))",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=oneshot",
            "ExecStart=" + createArguments.map(Self.quoted).joined(separator: " "),
        ]
        if loadsCredentials {
            lines.append("LoadCredential=aws:\(Self.credentialFile(directory: configurationDirectory, unit: unit))")
        }
        for (key, value) in environment.sorted(by: { $0.key < $1.key }) { lines.append("Environment=" + Self.quoted("\(key)=\(value)")) }
        return lines.joined(separator: "\n") + "\n"
    }

    /// What to put in /etc/cron.d where systemd is not PID 1 (cron's finest step is a minute).
    public var cronLine: String {
        let when: String
        switch timing {
        case .every(let seconds) where seconds % 86400 == 0: when = "0 0 */\(seconds / 86400) * *"
        case .every(let seconds) where seconds % 3600 == 0 && seconds < 86400: when = "0 */\(seconds / 3600) * * *"
        case .every(let seconds) where seconds >= 60 && seconds < 3600 && seconds % 60 == 0: when = "*/\(seconds / 60) * * * *"
        case .every: when = "* * * * *"
        case .calendar: when = "MIN HOUR DAY MONTH WEEKDAY"
        }
        return "\(when) root " + createArguments.joined(separator: " ")
    }

    /// The schedule a timer unit made by `timerUnit` records, or nil for any other file.
    public static func parse(timerUnit text: String, executable: String) -> BackupSchedule? {
        var fields: [String: String] = [:]
        var inKeel = false
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("[") { inKeel = line == "[X-Keel]"; continue }
            guard inKeel, let equals = line.firstIndex(of: "=") else { continue }
            fields[String(line[..<equals])] = String(line[line.index(after: equals)...])
        }
        guard let volume = fields["Volume"], let name = fields["Schedule"], let target = fields["Target"],
              let keep = fields["Keep"].flatMap(Int.init), let state = fields["StateDirectory"] else { return nil }
        let timing: Timing
        if let every = fields["Every"].flatMap(parseInterval) { timing = .every(seconds: every) } else if let spec = fields["OnCalendar"] {
            timing = .calendar(spec)
        } else { return nil }
        return BackupSchedule(volume: volume, name: name, target: target, timing: timing, keep: keep, stateDirectory: state,
                              executable: executable)
    }

    /// A word of a unit's command line or environment: double-quoted, with systemd's specifiers and variables kept literal.
    static func quoted(_ word: String) -> String {
        let literal = word.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "%", with: "%%").replacingOccurrences(of: "$", with: "$$")
        return "\"" + literal + "\""
    }
}
