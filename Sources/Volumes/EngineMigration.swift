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

    /// Starts engine B from `binary` standing by, on this node or on node
    /// `to` (through its agent), and records the migration; returns the
    /// record. Nothing is left if this throws.
    public func start(binary: String?, to: String? = nil, timeout: Double = 120) throws -> MigrationRecord {
        let held = try node.lock(name)
        defer { held.unlock() }
        let volume = try node.volume(name)
        if let running = try node.runningMigration(of: name) {
            let how = running.kind == Self.kind ? "confirm it with 'keel migrate confirm \(name)' or roll it back with 'keel migrate rollback \(name)'"
                : "follow it with 'keel migrate status \(name)'"
            throw KeelError("a \(running.kind == Self.kind ? "migration" : "move") of \(name) is running (\(running.phase)); \(how)")
        }
        if volume.enginePlacedElsewhere {
            return try startOnNode(to, volume: volume, binary: binary)
        }
        if let to, to != thisNodeName {
            throw KeelError("volume \(name) runs its engine on this host; keel migrate moves it to another node only when it "
                + "runs on engine nodes (keel volume create --engine-node), for now: leave out --to")
        }
        let runner = node.runner(volume.runner)
        guard runner.isRunning(node.engineDaemon(volume)) else {
            throw KeelError("volume \(name) has no running engine to migrate from; attach it ('keel volume attach \(name)') first")
        }
        if node.attachment(volume).frontendRunning { try checkDeviceCanBeHeld() }
        let executable = binary ?? node.executable
        guard access(executable, X_OK) == 0 else {
            throw KeelError("--binary \(executable) is not an executable file")
        }
        let now = Int64(Date().timeIntervalSince1970)
        var record = MigrationRecord(volume: name, kind: Self.kind, status: .migrating, phase: Phase.starting.rawValue,
                                     target: "this node (\(executable))", bytesDone: Phase.starting.percent, bytesTotal: 100,
                                     startedAt: now, updatedAt: now, pid: 0)
        let standby = try spawnStandby(volume, executable: executable)
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

    /// Engine B on node `to`, started standing by through its agent; engine A is the
    /// engine node's the device frontend is connected to.
    private func startOnNode(_ to: String?, volume: VolumeRecord, binary: String?) throws -> MigrationRecord {
        guard let to else {
            throw KeelError("volume \(name) runs its engine on engine nodes (\(volume.engineNodes.joined(separator: ", "))): "
                + "name the node engine B goes to with --to NODE")
        }
        guard binary == nil else {
            throw KeelError("--binary: an engine on an engine node runs its agent's keel; to upgrade, run the new keel's agent "
                + "on a node and migrate the engine there with --to")
        }
        let target = try node.registeredNode(to)
        guard node.attachment(volume).frontendRunning, let from = node.servingEngineNode(volume) else {
            throw KeelError("the device of \(name) is not connected to an engine on its engine nodes now (see 'keel volume show \(name)'); "
                + "attach it ('keel volume attach \(name) --mapper'), or try again once it is connected")
        }
        try checkDeviceCanBeHeld()
        guard from.name != to else {
            throw KeelError("engine A of \(name) runs on node \(to) already; name another node with --to")
        }
        let place = NodesMigrationTarget(to: to, from: from.name)
        let now = Int64(Date().timeIntervalSince1970)
        var record = MigrationRecord(volume: name, kind: Self.kind, status: .migrating, phase: Phase.starting.rawValue,
                                     target: place.description, bytesDone: Phase.starting.percent, bytesTotal: 100,
                                     startedAt: now, updatedAt: now, pid: 0)
        try node.registry.setMigration(record)
        node.logMigration("migration of \(name): engine B starting on node \(to) (engine A on node \(from.name)), standing by")
        node.stopIfAsked(at: .spawned, volume: name)
        do { _ = try RemoteEngineB.start(node.engineSpec(volume), on: target, volume: volume) } catch {
            RemoteEngineB(volume: volume, agent: target).stop()
            try? end(&record, .error, error: "\(error)")
            throw error
        }
        try end(&record, nil, phase: .standingBy)
        return record
    }

    /// The frontend's control API holds the device's I/O for the switch: it has one with its mapper device.
    private func checkDeviceCanBeHeld() throws {
        guard access(node.layout.frontendControl(name), F_OK) == 0 else {
            throw KeelError("volume \(name) is attached without its device-mapper device, so its I/O cannot be held for "
                + "the switch; detach it and attach it again with 'keel volume attach \(name) --mapper'")
        }
    }

    /// Engine B beside A on this node: a process of keel's own, or the volume's other engine unit under systemd.
    private func spawnStandby(_ volume: VolumeRecord, executable: String) throws -> any LocalStandby {
        volume.runner == .systemd ? try SystemdStandbyEngine.start(node: node, volume: volume, executable: executable)
            : try StandbyEngine.spawn(node: node, volume: volume, executable: executable)
    }

    /// The migration's engines: A and B beside each other on this node, or on two engine nodes.
    private func engines(_ volume: VolumeRecord, _ record: MigrationRecord) throws -> (a: any MigrationEngineA, b: any MigrationEngineB) {
        guard let place = NodesMigrationTarget(record) else {
            let standby: any MigrationEngineB = volume.runner == .systemd ? SystemdStandbyEngine(node: node, volume: volume)
                : StandbyEngine(node: node, volume: volume, pid: record.pid)
            return (LocalEngineA(node: node, volume: volume), standby)
        }
        return (RemoteEngineA(node: node, volume: volume, agent: try node.registeredNode(place.from)),
                RemoteEngineB(volume: volume, agent: try node.registeredNode(place.to)))
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
            try engineNodeChosen(volume, record)
            try end(&record, .success, phase: .done)
            return Confirmed(record: record, epoch: nil, heldMilliseconds: nil, alreadyOnB: true)
        }
        guard record.phase == Phase.standingBy.rawValue else {
            throw KeelError("the migration of \(name) is at '\(record.phase)', not standing by; roll it back with 'keel migrate rollback \(name)'")
        }
        let (engineA, engineB) = try engines(volume, record)
        do { try engineB.checkStandingBy() } catch {
            throw KeelError("engine B of \(name) is not ready: \(error); roll back with 'keel migrate rollback \(name)'")
        }
        node.logMigration("migration of \(name): confirming")
        let switched = try switchOver(from: engineA, to: engineB, volume: volume, record: &record, holdSeconds: holdSeconds, what: "engine B")
        engineA.retire()
        node.stopIfAsked(at: .switched, volume: name)
        record.pid = 0
        try engineNodeChosen(volume, record)
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

    /// B's node goes first in the volume's engine nodes: the next attach starts the engine there.
    private func engineNodeChosen(_ volume: VolumeRecord, _ record: MigrationRecord) throws {
        guard let place = NodesMigrationTarget(record) else { return }
        try node.registry.setEngineNodes([place.to] + volume.engineNodes.filter { $0 != place.to }, of: name)
    }

    /// The device's I/O held, engine A stopped, the standby engine B
    /// activated in its place, the device switched to it.
    private func switchOver(from engineA: any MigrationEngineA, to standby: any MigrationEngineB, volume: VolumeRecord,
                            record: inout MigrationRecord, holdSeconds: Double, what: String) throws -> (epoch: UInt64, heldMilliseconds: Int?) {
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
        do { try engineA.stop() } catch {
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
        } catch let error as EngineServesUnrecorded {
            // It serves: stopping it now would leave the volume without an engine.
            try end(&record, .error, error: error.message)
            throw KeelError(error.message)
        } catch {
            standby.stop()
            let back = restartOld(engineA, frontend: frontend)
            record.pid = 0
            try end(&record, .error, error: "\(what) could not take over: \(error); \(back)")
            throw KeelError("\(what) of \(name) could not take over: \(error); \(back)")
        }
        node.stopIfAsked(at: .activated, volume: name)
        try end(&record, nil, phase: .switching)
        // It died after it took over: the volume needs an engine. This keel's is at hand; an engine
        // node's the frontend starts again itself. A failed switch let the device's I/O go on: its
        // links reconnect to that engine by themselves.
        func restartAfterLoss(_ reason: String) throws -> Never {
            standby.stop()
            let back = engineA.frontendRestartsIt ? "the device frontend has the engine started again on an engine node that answers"
                : restartOld(engineA, frontend: frontend, switchDevice: false)
            record.pid = 0
            try end(&record, .error, error: "\(what) stopped after it took over (epoch \(activated.epoch)): \(reason); \(back)")
            throw KeelError("\(what) of \(name) stopped after it took over: \(reason); \(back)")
        }
        guard let frontend else {
            guard standby.runs else { try restartAfterLoss("its process is gone") }
            return (activated.epoch, nil)
        }
        do {
            let released = try callFrontend(frontend, doing: "switch engines") { [endpoint = standby.endpoint] in
                try await $0.switchEngine(.with { $0.engine = endpoint })
            }
            return (activated.epoch, Int(released.heldMicroseconds / 1000))
        } catch {
            guard !standby.runs else {
                try end(&record, .error, error: "\(what) serves the volume (epoch \(activated.epoch)) but the device could not switch: \(error)")
                throw KeelError("\(what) serves \(name) (epoch \(activated.epoch)) but the device could not switch to it: \(error)")
            }
            try restartAfterLoss("\(error)")
        }
    }

    // MARK: - Engine A lost

    /// The device frontend lost engine A while B stood by: B takes over (no
    /// hold: A answers nothing any more). B's NBD address when it serves the
    /// volume now; nil when no migration stands by or B cannot (the frontend
    /// then starts an engine as after any loss).
    public func takeOverAfterLoss() -> String? {
        guard let held = try? node.lock(name) else { return nil }
        defer { held.unlock() }
        guard let volume = try? node.volume(name), var record = try? running(),
              record.phase == Phase.standingBy.rawValue,
              let (engineA, engineB) = try? engines(volume, record),
              (try? engineB.checkStandingBy()) != nil else { return nil }
        // A hung rather than dead must not write after B claims.
        engineA.kill()
        node.logMigration("migration of \(name): engine A was lost; engine B takes over")
        do {
            try end(&record, nil, phase: .activating)
            let activated = try engineB.activate()
            engineA.retire()
            try end(&record, nil, phase: .tookOver)
            node.logMigration("migration of \(name): engine B serves epoch \(activated.epoch) after engine A was lost")
            return engineB.endpoint
        } catch {
            engineB.stop()
            record.pid = 0
            try? end(&record, .error, error: "engine A was lost and engine B could not take over: \(error); engine A is started again")
            return nil
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
        var unstopped = ""
        if let place = NodesMigrationTarget(record), let agent = try? node.registeredNode(place.to) {
            let engineB = RemoteEngineB(volume: volume, agent: agent)
            engineB.stop()
            if !AgentPlace(address: agent.address).answers(CancellableCalls()) {
                unstopped = " (engine B's node \(place.to) does not answer: nothing of it serves the volume, which a later engine's epoch fences anyway)"
            }
        } else {
            try engines(volume, record).b.stop()
        }
        record.pid = 0
        try end(&record, .error, error: "\(reason): the volume stays on engine A\(unstopped)", phase: .rolledBack)
        return record
    }

    /// After B took over from a lost A: A (this node's keel, or an engine on A's node) stands by
    /// and takes the volume back; refused when A's node does not answer.
    private func switchBackToA(_ volume: VolumeRecord, record: inout MigrationRecord) throws {
        node.logMigration("migration of \(name): rolling back to engine A, which was lost")
        let tookOver = record
        let serving: any MigrationEngineA
        let standby: any MigrationEngineB
        if let place = NodesMigrationTarget(record) {
            let nodeA = try node.registeredNode(place.from)
            guard AgentPlace(address: nodeA.address).answers(CancellableCalls()) else {
                throw KeelError("engine A's node \(place.from) does not answer, so the volume cannot go back to it: it runs on engine B "
                    + "(node \(place.to)); end the migration with 'keel migrate confirm \(name)'")
            }
            serving = RemoteEngineA(node: node, volume: volume, agent: try node.registeredNode(place.to))
            try end(&record, nil, phase: .restartingA)
            do { standby = try RemoteEngineB.start(node.engineSpec(volume), on: nodeA, volume: volume) } catch {
                RemoteEngineB(volume: volume, agent: nodeA).stop()
                record = tookOver
                try end(&record, nil)
                throw KeelError("engine A cannot be started again on node \(place.from): \(error); the volume stays on engine B")
            }
        } else {
            let spawned = try spawnStandby(volume, executable: node.executable)
            record.pid = spawned.pid
            try end(&record, nil, phase: .restartingA)
            do { try spawned.waitUntilStandingBy(timeout: 120) } catch {
                spawned.stop()
                record = tookOver
                try end(&record, nil)
                throw KeelError("engine A cannot be started again: \(error); the volume stays on engine B")
            }
            serving = LocalEngineA(node: node, volume: volume)
            standby = spawned
        }
        _ = try switchOver(from: serving, to: standby, volume: volume, record: &record, holdSeconds: 30, what: "engine A")
        serving.retire()
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
    private func restartOld(_ engineA: any MigrationEngineA, frontend: String?, switchDevice: Bool = true) -> String {
        let endpoint: String
        do { endpoint = try engineA.restart() } catch {
            return "engine A could not be started again either: \(error)\(switchDevice ? resume(frontend) : "")"
        }
        guard let frontend else { return "the volume runs on engine A again" }
        guard switchDevice else { return "the volume runs on engine A again, the device reconnecting to it" }
        do {
            _ = try callFrontend(frontend, doing: "switch engines") {
                try await $0.switchEngine(.with { $0.engine = endpoint })
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
