import ControlAPI
import Foundation
import NodeRegistry
import Syscalls

/// A move of a volume's replicas while it stays attached (or attachable): the new
/// replicas are placed and join in the registry as `joining`, the engine adds and
/// rebuilds them online in one pass, then the old ones leave the engine, the
/// registry and their nodes. No confirm step (as Cinder's). Cancelled, or failed
/// before the old replicas start leaving, it is undone: the new ones go, the old
/// set stays. The engine is what changes the membership on the replicas, so every
/// step that adds or removes one goes through a running engine (a detached
/// volume's is started for the move, as for a backup, and an attach takes it over).
///
/// Its state is the volume's migration record (`migrating_attachable`, then
/// `success` or `error`), written as it goes: `keel migrate status` reads it.
public final class ReplicaMove {
    public static let kind = "replicas"

    let node: Node
    let name: String
    let credentials: ControlCredentials
    public private(set) var record: MigrationRecord
    /// Besides a cancel recorded in the registry: e.g. SIGINT or SIGTERM of the moving process.
    public var interrupted: () -> Bool = { false }
    public var onProgress: (MigrationRecord) -> Void = { _ in }

    private init(node: Node, name: String, credentials: ControlCredentials, record: MigrationRecord) {
        self.node = node
        self.name = name
        self.credentials = credentials
        self.record = record
    }

    /// Places the new replicas and records the move; `run` does the rest. Nothing is
    /// left if this throws.
    public static func start(_ request: ReplicaMoveRequest, node: Node, credentials: ControlCredentials) throws -> ReplicaMove {
        let held = try node.lock(request.volume)
        defer { held.unlock() }
        let volume = try node.volume(request.volume)
        if let running = try node.runningMigration(of: volume.name) {
            throw KeelError("a \(running.kind == kind ? "move" : "migration") of \(volume.name) is running (\(running.phase)); "
                + "follow it with 'keel migrate status \(volume.name)' or stop it with 'keel volume move \(volume.name) --cancel'")
        }
        let plan = try ReplicaMovePlan(request, volume: volume, node: node)
        var nextSlot = (volume.replicas.map(\.slot).max() ?? -1) + 1
        var joining: [ReplicaRecord] = plan.joinAddresses.map {
            defer { nextSlot += 1 }
            return ReplicaRecord(address: "\($0)", slot: nextSlot, role: .joining)
        }
        let remote = RemoteReplicas(volume: volume, node: node, credentials: credentials)
        credentials.apply()
        // Nothing half-made: the replicas placed so far go again.
        let removePlaced = { _ = RemoteReplicas(volume: VolumeRecord(copying: volume, replicas: joining), node: node,
                                                credentials: credentials).remove() }
        do {
            for agent in plan.joinNodes {
                joining.append(try remote.place(slot: nextSlot, on: agent, role: .joining))
                nextSlot += 1
            }
        } catch {
            removePlaced()
            throw error
        }
        let leaving = Set(plan.leave.map(\.slot))
        let replicas = volume.replicas.map { replica in
            var replica = replica
            if leaving.contains(replica.slot) { replica.role = .leaving }
            return replica
        } + joining
        let now = Int64(Date().timeIntervalSince1970)
        let record = MigrationRecord(volume: volume.name, kind: kind, status: .migratingAttachable, phase: "adding",
                                     target: plan.target, bytesTotal: volume.size * UInt64(joining.count),
                                     startedAt: now, updatedAt: now, pid: getpid())
        do {
            try node.registry.setReplicas(replicas, of: volume.name)
            try node.registry.setMigration(record)
        } catch {
            removePlaced()
            try? node.registry.setReplicas(volume.replicas, of: volume.name)
            throw KeelError("cannot record the move of \(volume.name): \(error)")
        }
        return ReplicaMove(node: node, name: volume.name, credentials: credentials, record: record)
    }

    /// A move whose process is gone (killed, or its host rebooted), taken over to end it:
    /// undone, or finished if it had begun removing the old replicas.
    public static func takeOver(volume: String, node: Node, credentials: ControlCredentials) throws -> ReplicaMove? {
        guard let record = try node.registry.migration(of: volume), record.kind == kind, record.status.isRunning else { return nil }
        guard !processIsAlive(record.pid) else { return nil }
        var taken = record
        taken.pid = getpid()
        taken.cancelRequested = true
        try node.registry.setMigration(taken)
        return ReplicaMove(node: node, name: volume, credentials: credentials, record: taken)
    }

    /// Copies, then removes the old replicas; or undoes the move when it is cancelled or a new replica fails.
    /// Returns the final record (`success`, or `error` with the reason; a cancel is an error that says so).
    @discardableResult
    public func run() -> MigrationRecord {
        let engine: JobEngine
        do { engine = try JobEngine(node: node, volume: name, timeout: 120) } catch {
            return interrupt("\(error)")
        }
        let attachedAtStart = node.attachment(engine.volume).frontendRunning
        defer { releaseEngine(engine, attachedAtStart: attachedAtStart) }
        if record.phase != Self.removing {
            do {
                if record.cancelRequested { throw MoveStop.cancelled }
                try copyNewReplicas(engine)
            } catch let stop as MoveStop {
                return undo(engine, because: stop)
            } catch {
                return undo(engine, because: .failed("\(error)"))
            }
            update(phase: Self.removing)
        }
        // Past this point the membership may exclude the old replicas already: the move is only ever finished.
        do { try removeOldReplicas(engine) } catch {
            return interrupt("removing the old replicas failed: \(error)")
        }
        return end(.success, phase: "done")
    }

    /// The phase from which a move is finished, never undone.
    static let removing = "removing"

    enum MoveStop: Error {
        case cancelled
        case failed(String)
    }

    // MARK: - Copying

    /// The new replicas are added together: the engine rebuilds them in one pass (each region
    /// read once for all). Progress is the sum over them of what each has copied.
    private func copyNewReplicas(_ engine: JobEngine) throws {
        let volume = try node.volume(name)
        let joining = volume.replicas.filter(\.isNew)
        guard !joining.isEmpty else { return }
        update(phase: joining.count == 1 ? "copying" : "copying \(joining.count) replicas")
        let addresses = try joining.map(engineAddress)
        try add(addresses, engine: engine)
        var lastProgress = (bytes: UInt64.max, at: Date())
        var addedAgain = 0
        var writable = Set<String>()
        while writable.count < joining.count {
            if record.cancelRequested || interrupted() { throw MoveStop.cancelled }
            let status = try status(engine)
            var bytes: UInt64 = 0
            var missing: [String] = []
            for (replica, address) in zip(joining, addresses) {
                let state = status.replicas.last { $0.address == address }
                switch state?.mode {
                case "RW":
                    if writable.insert(address).inserted { try setRole(.joined, of: replica) }
                    bytes += volume.size
                case "WO":
                    bytes += state?.rebuiltBytes ?? 0
                case nil:
                    missing.append(address)
                default:
                    let why = state.map { $0.error.isEmpty ? $0.mode : $0.error } ?? "it left the volume"
                    throw MoveStop.failed("new replica \(replica.address) failed: \(why)")
                }
            }
            update(bytes: bytes)
            if bytes != lastProgress.bytes { lastProgress = (bytes, Date()) }
            if Date().timeIntervalSince(lastProgress.at) > 600 {
                throw MoveStop.failed("the new replicas copied nothing for 10 minutes")
            }
            if !missing.isEmpty {
                // An engine started again (its frontend restarts it) knows only the members: add them again.
                guard addedAgain < 3 else { throw MoveStop.failed("new replicas \(missing.joined(separator: ", ")) left the volume") }
                addedAgain += 1
                try add(missing, engine: engine)
            }
            if writable.count < joining.count {
                usleep(250_000)
                refreshCancel()
            }
        }
    }

    /// Asks the engine to add those of the replicas it does not have already (WO or RW); one it
    /// failed, or that came up stale when the engine was started for the move, is added again.
    private func add(_ addresses: [String], engine: JobEngine) throws {
        let present = try status(engine).replicas
        let absent = addresses.filter { address in
            !(present.last { $0.address == address }.map { ["WO", "RW"].contains($0.mode) } ?? false)
        }
        guard let first = absent.first else { return }
        _ = try callEngine(engine.control, doing: "add replicas \(absent.joined(separator: ", "))") {
            try await $0.addReplica(.with { $0.address = first; $0.togetherWith = Array(absent.dropFirst()) })
        }
    }

    /// The engine's status; an engine restarting (its frontend does that) is waited for up to a minute.
    private func status(_ engine: JobEngine) throws -> Keel_Control_V1_EngineStatus {
        let deadline = Date().addingTimeInterval(60)
        while true {
            do { return try callEngine(engine.control, doing: "report its status") { try await $0.status(.init()) } } catch {
                guard Date() < deadline else { throw error }
                usleep(500_000)
            }
        }
    }

    // MARK: - Finishing and undoing

    /// The old replicas leave the engine (the membership without them is recorded on the
    /// new ones), then the registry, then their nodes.
    private func removeOldReplicas(_ engine: JobEngine) throws {
        let volume = try node.volume(name)
        let leaving = volume.replicas.filter { $0.role == .leaving }
        for replica in leaving { try removeFromEngine(replica, engine: engine) }
        try rewriteReplicas { $0.filter { $0.role != .leaving }.map { $0.as(.member) } }
        deleteReplicas(leaving, of: volume)
    }

    private func undo(_ engine: JobEngine, because stop: MoveStop) -> MigrationRecord {
        update(phase: "cancelling")
        let reason: String
        switch stop {
        case .cancelled: reason = "cancelled; the volume keeps its old replicas"
        case .failed(let why): reason = "\(why); the new replicas were removed and the volume keeps its old ones"
        }
        do {
            let volume = try node.volume(name)
            let joining = volume.replicas.filter(\.isNew)
            for replica in joining { try removeFromEngine(replica, engine: engine) }
            try rewriteReplicas { $0.filter { !$0.isNew }.map { $0.as(.member) } }
            deleteReplicas(joining, of: volume)
        } catch {
            return interrupt("\(reason); but undoing it failed: \(error)")
        }
        return end(.error, phase: stop.isCancel ? "cancelled" : "failed", error: reason)
    }

    private func setRole(_ role: ReplicaRecord.Role, of replica: ReplicaRecord) throws {
        try rewriteReplicas { $0.map { $0.slot == replica.slot ? $0.as(role) : $0 } }
    }

    /// Under the volume's lock: attach reads the list to start an engine.
    private func rewriteReplicas(_ change: ([ReplicaRecord]) -> [ReplicaRecord]) throws {
        let held = try node.lock(name)
        defer { held.unlock() }
        try node.registry.setReplicas(change(try node.volume(name).replicas), of: name)
    }

    private func removeFromEngine(_ replica: ReplicaRecord, engine: JobEngine) throws {
        let address = try engineAddress(replica)
        let present = try status(engine).replicas.contains { $0.address == address && $0.mode != "REMOVED" }
        guard present else { return }
        _ = try callEngine(engine.control, doing: "remove replica \(address)") {
            try await $0.removeReplica(.with { $0.address = address })
        }
    }

    /// Stops the replicas and deletes their data, here or through their nodes' agents; what
    /// cannot be is logged in the record's phase and left (the registry has forgotten them).
    private func deleteReplicas(_ replicas: [ReplicaRecord], of volume: VolumeRecord) {
        let runner = node.runner(volume.runner)
        for replica in replicas {
            guard let (daemon, _) = node.localReplica(replica, of: volume), let directory = replica.directory else { continue }
            try? runner.stop(daemon)
            runner.forget(daemon)
            try? FileManager.default.removeItem(atPath: directory)
        }
        rmdir(node.layout.volumeDataDirectory(volume.name))  // the volume's last replica here: its directory goes too
        let slots = Set(replicas.map(\.slot))
        let failures = RemoteReplicas(volume: volume, node: node, credentials: credentials).remove { slots.contains($0.slot) }
        if !failures.isEmpty { record.error = "could not remove " + failures.joined(separator: "; ") }
    }

    /// Stops the engine when the move is what kept it: started for the move, or the volume was detached meanwhile.
    private func releaseEngine(_ engine: JobEngine, attachedAtStart: Bool) {
        if engine.startedForJob {
            engine.release()
        } else if attachedAtStart, let held = try? node.lock(name) {
            defer { held.unlock() }
            let volume = (try? node.volume(name)) ?? engine.volume
            if !node.attachment(volume).frontendRunning { try? node.runner(volume.runner).stop(node.engineDaemon(volume)) }
        }
    }

    // MARK: - The record

    private func engineAddress(_ replica: ReplicaRecord) throws -> String {
        "\(try parseListenAddress(replica.address, option: "replica"))"
    }

    private func refreshCancel() {
        if let stored = try? node.registry.migration(of: name), stored.startedAt == record.startedAt {
            record.cancelRequested = stored.cancelRequested
        }
    }

    private func update(phase: String? = nil, bytes: UInt64? = nil) {
        if let phase { record.phase = phase }
        if let bytes { record.bytesDone = min(bytes, record.bytesTotal) }
        record.updatedAt = Int64(Date().timeIntervalSince1970)
        try? node.registry.setMigration(record)
        onProgress(record)
    }

    /// Stopped half-way by something outside (an engine that cannot start, say): the record stays
    /// running, so that once this process is gone `keel volume move --cancel` takes it over.
    private func interrupt(_ why: String) -> MigrationRecord {
        record.error = "\(why); run 'keel volume move \(name) --cancel' to end the move"
        // A move interrupted while removing keeps that phase: it is taken over to be finished.
        update(phase: record.phase == Self.removing ? Self.removing : "interrupted")
        return record
    }

    private func end(_ status: MigrationRecord.Status, phase: String, error: String = "") -> MigrationRecord {
        record.status = status
        if status == .success { record.bytesDone = record.bytesTotal }
        if !error.isEmpty { record.error = error }
        update(phase: phase)
        return record
    }
}

extension ReplicaMove.MoveStop {
    var isCancel: Bool { if case .cancelled = self { return true } else { return false } }
}

extension ReplicaRecord {
    func `as`(_ role: Role) -> ReplicaRecord {
        var copy = self
        copy.role = role
        return copy
    }
}

extension VolumeRecord {
    /// The volume with another replica list (to act on some of its replicas).
    init(copying volume: VolumeRecord, replicas: [ReplicaRecord]) {
        self = volume
        self.replicas = replicas
    }
}

extension Node {
    /// The volume's migration while its process lives.
    public func runningMigration(of volume: String) throws -> MigrationRecord? {
        // A migration between engine nodes has no process here: its engines run on those nodes.
        guard let record = try registry.migration(of: volume), record.status.isRunning,
              processIsAlive(record.pid) || NodesMigrationTarget(record) != nil else { return nil }
        return record
    }
}

/// The pid names a live `keel` process (not one that reused the pid).
func processIsAlive(_ pid: Int32) -> Bool {
    guard pid > 0, kill(pid, 0) == 0 || errno == EPERM else { return false }
    guard let line = readSmallFile("/proc/\(pid)/cmdline", limit: 4096) else { return false }
    return line.contains("keel")
}
