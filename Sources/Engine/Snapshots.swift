import ControlAPI
import GRPCCore
import ReplicaIdentity
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

extension EngineDevice {
    /// Takes the snapshot `name` on every RW replica at one point of the write
    /// stream: new writes are held, those in flight finish (every replica has
    /// them), each replica freezes its head durably, then writes go on. A
    /// replica that fails the snapshot is failed: its chain may differ.
    /// Refused while a replica is being rebuilt: it would join without the snapshot.
    public func createSnapshot(name: String) throws -> [Keel_Control_V1_Snapshot] {
        guard SnapshotName.isValid(name) else {
            throw EngineError("'\(name)' is not a snapshot name: use \(SnapshotName.rule)")
        }
        guard !replicas.isFenced else { throw EngineError("this engine is fenced: a newer engine owns the volume") }
        let current = replicas.replicas
        if let rebuilding = current.first(where: { $0.mode == .wo }) {
            let percent = Int(Double(rebuilding.rebuiltBytes) * 100 / Double(max(size, 1)))
            throw EngineError("replica \(rebuilding.address) is being rebuilt (\(percent) % copied, \(rebuilding.rebuiltBytes) of \(size) bytes); take the snapshot when it is RW")
        }
        let writable = current.indices.filter { current[$0].mode == .rw }
        guard !writable.isEmpty else { throw EngineError("no replica is healthy: the volume cannot take a snapshot") }

        // Connected before writes are held: the pause is the replicas' freeze alone.
        let clients = writable.map { index in (index, try? ReplicaControlClient(address: current[index].controlAddress)) }
        let started = ContinuousClock.now
        guard gate.pauseWrites(seconds: replicaTimeoutSeconds) else {
            throw EngineError("writes in flight did not finish within \(replicaTimeoutSeconds) s; no snapshot was taken")
        }
        defer { gate.resumeWrites() }
        let owner = ownerMessage, timeout = replicaTimeoutSeconds * 2
        // The fault point: only the first replica is asked, then the engine dies.
        let calls = clients.prefix(faults.dieMidSnapshot ? 1 : clients.count).map { index, client in
            (index, client?.start(timeout: timeout) { stub, options in
                try await stub.freezeHead(.with { $0.owner = owner; $0.name = name }, options: options)
            })
        }
        if faults.dieMidSnapshot {
            _ = calls.first?.1?.take()
            kill(getpid(), SIGKILL)
        }
        let results = calls.map { index, call in
            (index, call?.take() ?? .failure(EngineError("its control API is unreachable")))
        }
        let paused = ContinuousClock.now - started
        withExtendedLifetime(clients) {}
        let taken = results.lazy.compactMap { try? $0.1.get().snapshots }.first
        let refusals = results.compactMap { _, result -> String? in
            guard case .failure(let error as RPCError) = result, error.code == .failedPrecondition else { return nil }
            return error.message
        }
        // Every replica refused before changing anything (a name taken): nothing to fail.
        if taken == nil && refusals.count == results.count { throw EngineError(refusals[0]) }
        for (index, result) in results {
            guard case .failure(let error) = result else { continue }
            if let error = error as? RPCError, error.code == .permissionDenied {
                replicas.fence(by: index)
            } else {
                replicas.fail(index, reason: "snapshot \(name) failed: \(error)")
            }
        }
        guard let taken else {
            throw EngineError("no replica took snapshot \(name); see the replicas' errors in `keel volume status`")
        }
        logger.notice("snapshot \(name) taken on \(writable.count) replicas; writes held for \(paused)")
        return taken
    }

    /// The snapshots as the first healthy replica holds them.
    public func listSnapshots() throws -> [Keel_Control_V1_Snapshot] {
        guard let replica = replicas.replicas.first(where: { $0.mode == .rw }) else {
            throw EngineError("no replica is healthy: the snapshots cannot be read")
        }
        do {
            return try ReplicaControlClient(address: replica.controlAddress).call(timeout: replicaTimeoutSeconds) {
                try await $0.status(.init(), options: $1)
            }.snapshots
        } catch {
            throw EngineError("cannot read the snapshots from \(replica.address): \(error)")
        }
    }
}
