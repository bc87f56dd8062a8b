import ControlAPI
import Daemons
import Foundation
import NodeRegistry
import Syscalls

/// A live migration of a volume's engine on this node (another keel binary:
/// a live upgrade). `start`: engine B starts standing by (its sessions to
/// every replica open, nothing claimed). `confirm`: the device frontend holds
/// the I/O above /dev/nbdX, engine A stops (answering everything it has),
/// B claims the replicas and takes A's place (its sockets and pid file), the
/// frontend connects the device to it and lets the I/O go on. `rollback`: B
/// goes away, A never noticed.
///
/// Its state is the volume's migration record (`migrating`, then `success` or
/// `error`); the record's pid is B's while it stands by.
public struct EngineMigration {
    public static let kind = "engine"

    /// The phases in order, with the progress each stands for.
    public enum Phase: String, CaseIterable {
        case starting = "starting engine B"
        case standingBy = "standing by"
        case holding = "holding the device's I/O"
        case stoppingOld = "stopping engine A"
        case activating = "activating engine B"
        case switching = "switching the device"
        /// Engine A was lost while B stood by: B took over; confirm ends it, rollback brings A back.
        case tookOver = "running on engine B (engine A was lost)"
        case restartingA = "starting engine A again"
        case done
        case rolledBack = "rolled back"

        var percent: UInt64 {
            switch self {
            case .starting: 10
            case .standingBy: 50
            case .holding: 60
            case .stoppingOld: 70
            case .activating: 80
            case .switching, .tookOver: 90
            case .restartingA: 50
            case .done, .rolledBack: 100
            }
        }
    }

    let node: Node
    let name: String

    public init(node: Node, volume: String) {
        self.node = node
        name = volume
        // A mistyped stop point fails here, before anything is started.
        _ = MigrationStopPoint.chosen
    }

    // MARK: - Start

    /// Starts engine B from `binary` standing by and records the migration;
    /// returns the record. Nothing is left if this throws.
    public func start(binary: String?, timeout: Double = 120) throws -> MigrationRecord {
        let held = try node.lock(name)
        defer { held.unlock() }
        let volume = try node.volume(name)
        if let running = try node.runningMigration(of: name) {
            let how = running.kind == Self.kind ? "confirm it with 'keel migrate confirm \(name)' or roll it back with 'keel migrate rollback \(name)'"
                : "follow it with 'keel migrate status \(name)'"
            throw KeelError("a \(running.kind == Self.kind ? "migration" : "move") of \(name) is running (\(running.phase)); \(how)")
        }
        guard !volume.enginePlacedElsewhere else {
            throw KeelError("volume \(name) runs its engine on engine nodes (\(volume.engineNodes.joined(separator: ", "))); "
                + "keel migrate moves an engine that runs on this host only, for now")
        }
        guard volume.runner == .keel else {
            throw KeelError("volume \(name) runs under systemd, whose unit keel-engine@\(name) cannot run twice; "
                + "keel migrate works for volumes keel runs itself (keel volume create without --systemd), for now")
        }
        let runner = node.runner(volume.runner)
        guard runner.isRunning(node.engineDaemon(volume)) else {
            throw KeelError("volume \(name) has no running engine to migrate from; attach it ('keel volume attach \(name)') first")
        }
        let attachment = node.attachment(volume)
        if attachment.frontendRunning {
            guard access(node.layout.frontendControl(name), F_OK) == 0 else {
                throw KeelError("volume \(name) is attached without its device-mapper device, so its I/O cannot be held for "
                    + "the switch; detach it and attach it again with 'keel volume attach \(name) --mapper'")
            }
        }
        let executable = binary ?? node.executable
        guard access(executable, X_OK) == 0 else {
            throw KeelError("--binary \(executable) is not an executable file")
        }
        let now = Int64(Date().timeIntervalSince1970)
        var record = MigrationRecord(volume: name, kind: Self.kind, status: .migrating, phase: Phase.starting.rawValue,
                                     target: "this node (\(executable))", bytesDone: Phase.starting.percent, bytesTotal: 100,
                                     startedAt: now, updatedAt: now, pid: 0)
        let standby = try StandbyEngine.spawn(node: node, volume: volume, executable: executable)
        let pid = standby.pid
        record.pid = pid
        do { try node.registry.setMigration(record) } catch {
            standby.stop()
            throw KeelError("cannot record the migration of \(name): \(error); nothing was started")
        }
        node.logMigration("migration of \(name): engine B (pid \(pid), \(executable)) starting, standing by")
        node.stopIfAsked(at: .spawned, volume: name)
        do { try standby.waitUntilStandingBy(timeout: timeout) } catch {
            standby.stop()
            try? end(&record, .error, error: "\(error)")
            throw error
        }
        try end(&record, nil, phase: .standingBy)
        return record
    }

    // MARK: - Confirm

    /// Switches the volume to engine B. On a failure before B took over, the
    /// volume goes on with engine A (restarted if it had stopped) and the
    /// record says what happened. After A was lost and B took over, it ends
    /// the migration and says so.
    public func confirm(holdSeconds: Double = 30) throws -> Confirmed {
        let held = try node.lock(name)
        defer { held.unlock() }
        let volume = try node.volume(name)
        var record = try running()
        if record.phase == Phase.tookOver.rawValue {
            record.pid = 0
            try end(&record, .success, phase: .done)
            return Confirmed(record: record, epoch: nil, heldMilliseconds: nil, alreadyOnB: true)
        }
        guard record.phase == Phase.standingBy.rawValue else {
            throw KeelError("the migration of \(name) is at '\(record.phase)', not standing by; roll it back with 'keel migrate rollback \(name)'")
        }
        let standby = StandbyEngine(node: node, volume: volume, pid: record.pid)
        do { try standby.checkStandingBy() } catch {
            throw KeelError("engine B of \(name) is not ready: \(error); roll back with 'keel migrate rollback \(name)'")
        }
        node.logMigration("migration of \(name): confirming")
        let switched = try switchOver(to: standby, volume: volume, record: &record, holdSeconds: holdSeconds, what: "engine B")
        node.stopIfAsked(at: .switched, volume: name)
        record.pid = 0
        try end(&record, .success, phase: .done)
        node.logMigration("migration of \(name): done, engine B serves epoch \(switched.epoch)"
                          + (switched.heldMilliseconds.map { ", the device's I/O held \($0) ms" } ?? ""))
        return Confirmed(record: record, epoch: switched.epoch, heldMilliseconds: switched.heldMilliseconds, alreadyOnB: false)
    }

    public struct Confirmed {
        public var record: MigrationRecord
        public var epoch: UInt64?
        public var heldMilliseconds: Int?
        /// Engine A was lost during the migration and B had taken over already.
        public var alreadyOnB: Bool
    }

    /// The device's I/O held, the engine serving stopped, the standby engine
    /// (`record.pid`) activated in its place, the device switched to it.
    private func switchOver(to standby: StandbyEngine, volume: VolumeRecord, record: inout MigrationRecord,
                            holdSeconds: Double, what: String) throws -> (epoch: UInt64, heldMilliseconds: Int?) {
        let runner = node.runner(volume.runner)
        let engine = node.engineDaemon(volume)
        let frontend = node.attachment(volume).frontendRunning ? "unix:" + node.layout.frontendControl(name) : nil
        let phase = record.phase
        if let frontend {
            try end(&record, nil, phase: .holding)
            do { _ = try callFrontend(frontend, doing: "hold the device's I/O") { try await $0.hold(.with { $0.holdSeconds = holdSeconds }) } } catch {
                try end(&record, nil, phase: Phase(rawValue: phase))
                throw KeelError("\(error); the migration stands by: try again, or roll it back")
            }
            node.stopIfAsked(at: .held, volume: name)
        }
        try end(&record, nil, phase: .stoppingOld)
        do { try runner.stop(engine) } catch {
            // The engine serving cannot be known to have answered everything: the new one must not claim.
            let resumed = resume(frontend)
            try end(&record, nil, phase: Phase(rawValue: phase))
            throw KeelError("cannot stop the engine of \(name): \(error)\(resumed); the migration stands by")
        }
        node.stopIfAsked(at: .oldStopped, volume: name)
        try end(&record, nil, phase: .activating)
        let activated: Keel_Control_V1_Activated
        do {
            activated = try standby.activate()
        } catch {
            standby.stop()
            let back = restartOld(volume, runner: runner, engine: engine, frontend: frontend)
            record.pid = 0
            try end(&record, .error, error: "\(what) could not take over: \(error); \(back)")
            throw KeelError("\(what) of \(name) could not take over: \(error); \(back)")
        }
        do { try standby.takePlace() } catch {
            try end(&record, .error, error: "\(error)")
            throw error
        }
        node.stopIfAsked(at: .activated, volume: name)
        try end(&record, nil, phase: .switching)
        // It died after it took over: the volume needs an engine, and this keel's is at hand. A failed
        // switch let the device's I/O go on: its links reconnect to that engine by themselves.
        func restartAfterLoss(_ reason: String) throws -> Never {
            let back = restartOld(volume, runner: runner, engine: engine, frontend: frontend, switchDevice: false)
            record.pid = 0
            try end(&record, .error, error: "\(what) stopped after it took over (epoch \(activated.epoch)): \(reason); \(back)")
            throw KeelError("\(what) of \(name) stopped after it took over: \(reason); \(back)")
        }
        guard let frontend else {
            guard runner.isRunning(engine) else { try restartAfterLoss("its process is gone") }
            return (activated.epoch, nil)
        }
        do {
            let released = try callFrontend(frontend, doing: "switch engines") { [socket = node.layout.engineSocket(name)] in
                try await $0.switchEngine(.with { $0.engine = "unix:" + socket })
            }
            return (activated.epoch, Int(released.heldMicroseconds / 1000))
        } catch {
            guard !runner.isRunning(engine) else {
                try end(&record, .error, error: "\(what) serves the volume (epoch \(activated.epoch)) but the device could not switch: \(error)")
                throw KeelError("\(what) serves \(name) (epoch \(activated.epoch)) but the device could not switch to it: \(error)")
            }
            try restartAfterLoss("\(error)")
        }
    }

    // MARK: - Engine A lost

    /// The device frontend lost engine A while B stood by: B takes over (no
    /// hold: A answers nothing any more). True when B serves the volume now;
    /// false when no migration stands by or B cannot (the frontend then
    /// starts A again).
    public func takeOverAfterLoss() -> Bool {
        guard let held = try? node.lock(name) else { return false }
        defer { held.unlock() }
        guard let volume = try? node.volume(name), var record = try? running(),
              record.phase == Phase.standingBy.rawValue else { return false }
        let standby = StandbyEngine(node: node, volume: volume, pid: record.pid)
        guard (try? standby.checkStandingBy()) != nil else { return false }
        let engine = node.engineDaemon(volume)
        let runner = node.runner(volume.runner)
        // A hung rather than dead must not write after B claims.
        if runner.isRunning(engine) { try? runner.killNow(engine) }
        node.logMigration("migration of \(name): engine A was lost; engine B takes over")
        do {
            try end(&record, nil, phase: .activating)
            let activated = try standby.activate()
            try standby.takePlace()
            try end(&record, nil, phase: .tookOver)
            node.logMigration("migration of \(name): engine B serves epoch \(activated.epoch) after engine A was lost")
            return true
        } catch {
            standby.stop()
            record.pid = 0
            try? end(&record, .error, error: "engine A was lost and engine B could not take over: \(error); engine A is started again")
            return false
        }
    }

    // MARK: - Rollback

    /// Stops engine B; engine A never noticed.
    public func rollback() throws -> MigrationRecord {
        try rollback(because: "rolled back", locked: false)
    }

    /// `locked`: the caller holds the volume's lock (a detach).
    func rollback(because reason: String, locked: Bool) throws -> MigrationRecord {
        let held = locked ? nil : try node.lock(name)
        defer { held?.unlock() }
        let volume = try node.volume(name)
        guard var record = try node.registry.migration(of: name), record.kind == Self.kind, record.status.isRunning else {
            throw KeelError("no migration of \(name)'s engine is running: nothing to roll back (see 'keel migrate status \(name)')")
        }
        if record.phase == Phase.tookOver.rawValue {
            try switchBackToA(volume, record: &record)
            return record
        }
        node.stopIfAsked(at: .rollingBack, volume: name)
        StandbyEngine(node: node, volume: volume, pid: record.pid).stop()
        record.pid = 0
        try end(&record, .error, error: "\(reason): the volume stays on engine A", phase: .rolledBack)
        return record
    }

    /// After B took over from a lost A: A (this node's keel) stands by and takes the volume back.
    private func switchBackToA(_ volume: VolumeRecord, record: inout MigrationRecord) throws {
        node.logMigration("migration of \(name): rolling back to engine A, which was lost")
        let serving = record.pid
        let standby = try StandbyEngine.spawn(node: node, volume: volume, executable: node.executable)
        record.pid = standby.pid
        try end(&record, nil, phase: .restartingA)
        do { try standby.waitUntilStandingBy(timeout: 120) } catch {
            standby.stop()
            record.pid = serving
            try end(&record, nil, phase: .tookOver)
            throw KeelError("engine A cannot be started again: \(error); the volume stays on engine B")
        }
        _ = try switchOver(to: standby, volume: volume, record: &record, holdSeconds: 30, what: "engine A")
        record.pid = 0
        try end(&record, .error, error: "rolled back: engine A was started again and the volume switched back to it", phase: .rolledBack)
    }

    // MARK: - Steps

    private func running() throws -> MigrationRecord {
        guard let record = try node.registry.migration(of: name), record.kind == Self.kind, record.status.isRunning else {
            throw KeelError("no migration of \(name)'s engine is running; start one with 'keel migrate start \(name)'")
        }
        return record
    }

    private func resume(_ frontend: String?) -> String {
        guard let frontend else { return "" }
        do {
            _ = try callFrontend(frontend, doing: "resume the device's I/O") { try await $0.resume(.init()) }
            return ""
        } catch {
            return " (and the device's I/O could not be resumed: \(error); it resumes by itself after its hold)"
        }
    }

    /// After B failed to take over: A again, the device on it.
    private func restartOld(_ volume: VolumeRecord, runner: any DaemonRunner, engine: Daemon, frontend: String?,
                            switchDevice: Bool = true) -> String {
        do {
            try runner.start(engine)
            try node.waitForEngine(of: name, engine, runner: runner, before: Date().addingTimeInterval(120), timeout: 120)
        } catch {
            return "engine A could not be started again either: \(error)\(switchDevice ? resume(frontend) : "")"
        }
        guard let frontend else { return "the volume runs on engine A again" }
        guard switchDevice else { return "the volume runs on engine A again, the device reconnecting to it" }
        do {
            _ = try callFrontend(frontend, doing: "switch engines") { [socket = node.layout.engineSocket(name)] in
                try await $0.switchEngine(.with { $0.engine = "unix:" + socket })
            }
        } catch {
            return "engine A runs again, but the device could not switch back: \(error)"
        }
        return "the volume runs on engine A again"
    }

    /// Records the phase (its progress) and, with a status, the end.
    private func end(_ record: inout MigrationRecord, _ status: MigrationRecord.Status?, error: String = "",
                     phase: Phase? = nil) throws {
        if let phase {
            record.phase = phase.rawValue
            record.bytesDone = phase.percent
        }
        if let status { record.status = status }
        if !error.isEmpty { record.error = error }
        record.updatedAt = Int64(Date().timeIntervalSince1970)
        try node.registry.setMigration(record)
        if let status, status == .error { node.logMigration("migration of \(name): \(status.rawValue): \(record.error)") }
    }
}

extension Node {
    /// Migrations' starts, steps and ends, one line each, in the node's log directory.
    func logMigration(_ line: String) {
        let path = "\(layout.logDirectory)/keel-migrations.log"
        let text = ISO8601DateFormatter().string(from: Date()) + " " + line + "\n"
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        _ = write(fd, text, text.utf8.count)
        close(fd)
    }
}
