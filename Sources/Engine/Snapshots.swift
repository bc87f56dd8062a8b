import ControlAPI
import GRPCCore
import ReplicaIdentity
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

extension EngineDevice {
    /// Snapshots change only while no replica is being given them or rebuilt.
    private func refuseWhileRebuilding(_ current: [ReplicaSet.Replica], _ what: String) throws {
        if let target = copyingChain.withLock({ $0 }) {
            throw EngineError("replica \(target) is being given the snapshots; \(what) once it is RW")
        }
        if let rebuilding = current.first(where: { $0.mode == .wo }) {
            let percent = Int(Double(rebuilding.rebuiltBytes) * 100 / Double(max(size, 1)))
            throw EngineError("replica \(rebuilding.address) is being rebuilt (\(percent) % copied, \(rebuilding.rebuiltBytes) of \(size) bytes); \(what) when it is RW")
        }
    }

    /// Takes the snapshot `name` on every RW replica at one point of the write
    /// stream: new writes are held, those in flight finish (every replica has
    /// them), each replica freezes its head, then writes go on; the answer
    /// waits for every replica to seal it (its layer on disk). A replica
    /// that fails the snapshot is failed: its chain may differ.
    /// Refused while a replica is being rebuilt: it would join without the snapshot.
    public func createSnapshot(name: String) throws -> [Keel_Control_V1_Snapshot] {
        guard SnapshotName.isValid(name) else {
            throw EngineError("'\(name)' is not a snapshot name: use \(SnapshotName.rule)")
        }
        guard !replicas.isFenced else { throw EngineError("this engine is fenced: a newer engine owns the volume") }
        let current = replicas.replicas
        try refuseWhileRebuilding(current, "take the snapshot")
        let writable = current.indices.filter { current[$0].mode == .rw }
        guard !writable.isEmpty else { throw EngineError("no replica is healthy: the volume cannot take a snapshot") }

        // Connected, and the new heads recorded, before writes are held: the pause is the switch alone.
        let clients = writable.map { index in (index, try? ReplicaControlClient(address: current[index].controlAddress)) }
        defer { withExtendedLifetime(clients) {} }
        let preparing = ContinuousClock.now
        let prepared = freezeCalls(clients, name: name, prepare: true)
        let preparation = ContinuousClock.now - preparing
        if let (index, error) = prepared.first(where: { $0.1 != nil }) {
            if let error = error as? RPCError, error.code == .permissionDenied { replicas.fence(by: index) }
            // Nothing was switched: no replica is failed, the snapshot is not taken.
            let reason = (error as? RPCError).map(\.message) ?? "\(error!)"
            throw EngineError(reason.contains("snapshot") ? reason
                              : "replica \(current[index].address) cannot prepare snapshot \(name): \(reason)")
        }

        let started = ContinuousClock.now
        guard gate.pauseWrites(seconds: replicaTimeoutSeconds) else {
            throw EngineError("writes in flight did not finish within \(replicaTimeoutSeconds) s; no snapshot was taken")
        }
        // The fault point: only the first replica switches, then the engine dies, writes held.
        let switched = freezeCalls(Array(clients.prefix(faults.dieMidSnapshot ? 1 : clients.count)), name: name, prepare: false)
        if faults.dieMidSnapshot { kill(getpid(), SIGKILL) }
        gate.resumeWrites()
        let paused = ContinuousClock.now - started

        for (index, error) in switched {
            guard let error else { continue }
            if let error = error as? RPCError, error.code == .permissionDenied {
                replicas.fence(by: index)
            } else {
                replicas.fail(index, reason: "snapshot \(name) failed: \(error)")
            }
        }
        let took = switched.filter { $0.1 == nil }.map(\.0)
        guard !took.isEmpty else {
            throw EngineError("no replica took snapshot \(name); see the replicas' errors in `keel status`")
        }
        let sealing = ContinuousClock.now
        let sealed = sealedReplicas(clients.filter { took.contains($0.0) }, name: name)
        guard !sealed.isEmpty else {
            throw EngineError("no replica sealed snapshot \(name); see the replicas' errors in `keel status`")
        }
        // As a write's answer: a replica failed here must be out of the recorded membership first.
        guard replicas.waitUntilMembershipRecorded(seconds: replicaTimeoutSeconds * 2) else {
            throw EngineError("snapshot \(name) was taken, but the membership without the replicas that failed it "
                              + "is not recorded; see keel status")
        }
        let sealTime = ContinuousClock.now - sealing
        logger.notice("snapshot \(name) taken on \(sealed.count) replicas: prepared in \(preparation), writes held for \(paused), sealed in \(sealTime)")
        return try listSnapshots()
    }

    /// Waits for each replica to seal snapshot `name` (its layer synced, then
    /// recorded; the replica's status answers once it has); fails those that
    /// do not. Until every member has sealed it, a crash undoes the snapshot.
    private func sealedReplicas(_ clients: [(Int, ReplicaControlClient?)], name: String) -> [Int] {
        // The sync writes out all the layer's cached data: a generous bound of 20 MB/s.
        let timeout = max(replicaTimeoutSeconds * 4, Double(size) / 20e6)
        let answers = controlCalls(clients, timeout: timeout) { stub, options in
            let status = try await stub.status(.init(), options: options)
            guard let snapshot = status.snapshots.first(where: { $0.name == name }) else {
                throw EngineError("it does not list the snapshot")
            }
            guard !snapshot.unsealed else { throw EngineError("its layer could not be synced") }
        }
        var sealed: [Int] = []
        for (index, error) in answers {
            guard let error else { sealed.append(index); continue }
            replicas.fail(index, reason: "snapshot \(name) was not sealed: \(error)")
        }
        return sealed
    }

    /// One step of the freeze on every replica at once; each one's error, or nil.
    private func freezeCalls(_ clients: [(Int, ReplicaControlClient?)], name: String, prepare: Bool) -> [(Int, Error?)] {
        let owner = ownerMessage
        return controlCalls(clients, timeout: replicaTimeoutSeconds * 2) { stub, options in
            _ = try await stub.freezeHead(.with { $0.owner = owner; $0.name = name; $0.prepare = prepare }, options: options)
        }
    }

    /// One call on every replica at once; each one's error, or nil.
    private func controlCalls(_ clients: [(Int, ReplicaControlClient?)], timeout: Double,
                              _ body: @escaping @Sendable (ReplicaControlClient.Stub, CallOptions) async throws -> Void)
        -> [(Int, Error?)] {
        let calls = clients.map { index, client in (index, client?.start(timeout: timeout, body)) }
        return calls.map { index, call in
            guard let call else { return (index, EngineError("its control API is unreachable")) }
            if case .failure(let error) = call.take() { return (index, error) }
            return (index, nil)
        }
    }

    /// Removes the snapshot `name` online: every RW replica merges its layer
    /// into the next newer one while writes go on (reads stay the same
    /// throughout). First every replica is asked whether it can (the name is
    /// known, no export reads it), so that a refusal changes nothing.
    public func removeSnapshot(name: String) throws -> [Keel_Control_V1_Snapshot] {
        let (current, clients) = try chainChange(of: name, "remove the snapshot")
        defer { withExtendedLifetime(clients) {} }
        try refuseOnAnyReplica(mergeCalls(clients, name: name, check: true, timeout: replicaTimeoutSeconds * 2),
                               current, name)

        // Copying takes as long as the layer's data: a generous bound of 20 MB/s.
        let timeout = max(replicaTimeoutSeconds * 4, Double(size) / 20e6)
        let merged = mergeCalls(Array(clients.prefix(faults.dieMidRemoval ? 1 : clients.count)), name: name,
                                check: false, timeout: timeout)
        if faults.dieMidRemoval { kill(getpid(), SIGKILL) }
        // A replica whose merge failed reads as before, the snapshot still in
        // its chain: it stays RW, and removing again (or the next engine) finishes.
        let failed = merged.compactMap { index, error in error.map { (index, $0) } }
        for (index, error) in failed {
            if let error = error as? RPCError, error.code == .permissionDenied { replicas.fence(by: index) }
            logger.error("replica \(current[index].address) could not remove snapshot \(name): \(error)")
        }
        if let (index, error) = failed.first {
            let reason = (error as? RPCError).map(\.message) ?? "\(error)"
            throw EngineError("snapshot \(name) was removed on \(merged.count - failed.count) of \(merged.count) replicas "
                              + "(\(current[index].address): \(reason)); reads are unchanged: run keel snapshot rm \(volume) \(name) again")
        }
        logger.notice("snapshot \(name) removed on \(merged.count) replicas")
        return try listSnapshots()
    }

    /// Reverts the volume to snapshot `name`: every RW replica discards its
    /// head (and, with `discardNewer`, the snapshots newer than `name`) and
    /// starts an empty head on it. Only while no client is attached
    /// (`attached`: the kernel device or NBD clients): their caches would
    /// hold what the revert discards. Every replica is asked first (nothing
    /// changes on a refusal); the whole volume is marked dirty on each as it
    /// reverts and cleared once all have, so an engine stopped half way
    /// leaves replicas the next one resyncs. A replica that fails is failed.
    public func revertSnapshot(name: String, discardNewer: Bool, attached: String?) throws -> [Keel_Control_V1_Snapshot] {
        if let attached {
            throw EngineError("volume \(volume) is attached (\(attached)); detach it or disable its frontend before reverting")
        }
        let (current, clients) = try chainChange(of: name, "revert")
        defer { withExtendedLifetime(clients) {} }
        let owner = ownerMessage
        func revertCalls(check: Bool, on chosen: [(Int, ReplicaControlClient?)]) -> [(Int, Error?)] {
            controlCalls(chosen, timeout: replicaTimeoutSeconds * 2) { stub, options in
                _ = try await stub.revertToSnapshot(.with {
                    $0.owner = owner; $0.name = name; $0.discardNewer = discardNewer; $0.check = check
                }, options: options)
            }
        }
        try refuseOnAnyReplica(revertCalls(check: true, on: clients), current, name)

        guard gate.pauseWrites(seconds: replicaTimeoutSeconds) else {
            throw EngineError("writes in flight did not finish within \(replicaTimeoutSeconds) s; nothing was reverted")
        }
        defer { gate.resumeWrites() }
        // The keeper's own dirty regions go first: its clears must not remove the whole-volume mark.
        guard pollUntil(seconds: Double(KeeperCycle.idleTicks) + replicaTimeoutSeconds, { gate.nonCleanRegions().isEmpty }) else {
            throw EngineError("recent writes' dirty regions were not cleared in time; nothing was reverted, try again")
        }
        let reverted = revertCalls(check: false, on: Array(clients.prefix(faults.dieMidRevert ? 1 : clients.count)))
        if faults.dieMidRevert { kill(getpid(), SIGKILL) }
        let done = reverted.filter { $0.1 == nil }.map(\.0)
        let unchanged = { (error: Error?) in (error as? RPCError)?.code == .aborted }
        if done.isEmpty && reverted.allSatisfy({ unchanged($0.1) }) {
            throw EngineError("no replica reverted to snapshot \(name), nothing changed: \(reverted.first!.1!)")
        }
        // Replicas that did not revert now differ from those that did.
        for (index, error) in reverted {
            guard let error else { continue }
            if let error = error as? RPCError, error.code == .permissionDenied {
                replicas.fence(by: index)
            } else {
                replicas.fail(index, reason: "reverting to snapshot \(name) failed: \(error)")
            }
        }
        guard !done.isEmpty else { throw EngineError("no replica reverted to snapshot \(name); see keel status") }
        let whole = Keel_Control_V1_ByteRange.with { $0.offset = 0; $0.length = size }
        let cleared = controlCalls(clients.filter { done.contains($0.0) }, timeout: replicaTimeoutSeconds * 2) { stub, options in
            _ = try await stub.clearDirty(.with { $0.owner = owner; $0.ranges = [whole] }, options: options)
        }
        for (index, error) in cleared where error != nil {
            logger.warning("replica \(current[index].address) keeps the volume marked dirty after the revert: \(error!); the next start resyncs it")
        }
        logger.notice("volume \(volume) reverted to snapshot \(name) on \(done.count) replicas")
        return try listSnapshots()
    }

    /// What removing or reverting needs first: a valid name, an unfenced
    /// engine, no rebuild, and a control client per RW replica.
    private func chainChange(of name: String, _ what: String)
        throws -> (current: [ReplicaSet.Replica], clients: [(Int, ReplicaControlClient?)]) {
        guard SnapshotName.isValid(name) else {
            throw EngineError("'\(name)' is not a snapshot name: use \(SnapshotName.rule)")
        }
        guard !replicas.isFenced else { throw EngineError("this engine is fenced: a newer engine owns the volume") }
        let current = replicas.replicas
        try refuseWhileRebuilding(current, what)
        let writable = current.indices.filter { current[$0].mode == .rw }
        guard !writable.isEmpty else { throw EngineError("no replica is healthy: cannot \(what)") }
        return (current, writable.map { index in (index, try? ReplicaControlClient(address: current[index].controlAddress)) })
    }

    /// The first refusal of a checking call, as the user's one line (nothing changed).
    private func refuseOnAnyReplica(_ checked: [(Int, Error?)], _ current: [ReplicaSet.Replica], _ name: String) throws {
        guard let (index, error) = checked.first(where: { $0.1 != nil }), let error else { return }
        if let error = error as? RPCError, error.code == .permissionDenied { replicas.fence(by: index) }
        if let error = error as? RPCError, error.code == .notFound {
            throw EngineError("volume \(volume) has no snapshot '\(name)'; see keel snapshot ls \(volume)")
        }
        throw EngineError((error as? RPCError).map(\.message) ?? "replica \(current[index].address): \(error)")
    }

    private func mergeCalls(_ clients: [(Int, ReplicaControlClient?)], name: String, check: Bool,
                            timeout: Double) -> [(Int, Error?)] {
        let owner = ownerMessage
        return controlCalls(clients, timeout: timeout) { stub, options in
            _ = try await stub.mergeSnapshot(.with { $0.owner = owner; $0.name = name; $0.check = check }, options: options)
        }
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
