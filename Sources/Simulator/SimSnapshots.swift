import Engine

/// Snapshots in the simulation, as `EngineDevice.createSnapshot` and
/// `removeSnapshot` take them: create holds writes, waits until none is in
/// flight, switches every RW replica's head (one a step, so that a crash can
/// fall between two), lets writes go, awaits each replica's seal (one a
/// step), then the membership without those that failed; remove merges the
/// layer away on each RW replica, one a step. The next start's
/// `ChainReconciliation` (through `SimStartupLinks`) undoes a create and
/// finishes a removal that a crash left half done.
///
/// Invariants: a snapshot reads, on every replica that holds it, what the
/// volume held when it was taken (every write acknowledged before the create
/// began, none issued after); every healthy member holds the same snapshots,
/// reading the same; after a start none is unsealed and every acknowledged
/// one not being removed is there; after a power cut, a snapshot still holds
/// every write acknowledged durable before the create began.
extension Simulation {
    /// Snapshots the client was told about: what each must read.
    struct ExpectedSnapshot {
        var content: [UInt64]
        let durableFloor: [UInt64]
        /// What each block held at the last recovery before the create, and when: it counts as written then.
        let baseline: [(generation: UInt64, at: UInt64)]
        /// Once a removal began, the snapshot may be gone.
        var removalBegun = false
    }

    func snapshotStep() {
        // The replicas' background seal of the layers they froze, now and then.
        if random.chance(perMille: 300) { replicas[random.below(replicas.count)].seal() }
        let e = engine!
        guard !e.crashed, !e.replicas.isFenced else { return }
        switch e.chainChange {
        case nil:
            beginChainChange(on: e)
        case .taking(let snapshot, let waits, var left):
            guard e.gate.noWriteInFlight else {
                // As the engine's bound on the wait: give up, writes go on, nothing was switched.
                if waits >= Self.snapshotWaits {
                    trace?("\(e.id) snapshot \(snapshot.name): writes in flight did not finish, not taken")
                    e.gate.resumeWrites()
                    e.chainChange = nil
                } else {
                    e.chainChange = .taking(snapshot, waits: waits + 1, left: left)
                }
                return
            }
            if let slot = left.first {
                left.removeFirst()
                switchHead(of: slot, on: e, to: snapshot.name)
                e.chainChange = .taking(snapshot, waits: waits, left: left)
                guard left.isEmpty else { return }
            }
            e.gate.resumeWrites()
            e.chainChange = .sealing(snapshot, left: e.replicas.replicas.indices.filter { e.replicas.mode($0) == .rw })
        case .sealing(let snapshot, var left):
            if let slot = left.first {
                left.removeFirst()
                awaitSeal(of: slot, on: e, snapshot.name)
                e.chainChange = .sealing(snapshot, left: left)
                return
            }
            // As a write's answer, the create's waits for a membership without the replicas it failed.
            guard !e.replicas.holdsAcknowledgements else { return }
            e.chainChange = nil
            snapshotTaken(snapshot, on: e)
        case .removing(let name, var left):
            if let slot = left.first {
                left.removeFirst()
                let r = replicas[e.replicaOf[slot]]
                if e.replicas.mode(slot) == .rw && e.linkAlive[slot] && r.running && r.epoch == e.epoch {
                    trace?("\(e.id) snapshot \(name) removed on replica \(e.replicaOf[slot])")
                    r.removeSnapshot(name)
                }
                e.chainChange = .removing(name: name, left: left)
                if !left.isEmpty { return }
            }
            e.chainChange = nil
            counts.snapshotsRemoved += 1
        }
    }

    /// The bound on a create's wait for writes in flight, in steps.
    static let snapshotWaits = 400

    private func beginChainChange(on e: SimEngine) {
        let slots = e.replicas.replicas.indices
        guard e.rebuild == nil, !slots.contains(where: { e.replicas.mode($0) == .wo }) else { return }
        let writable = slots.filter { e.replicas.mode($0) == .rw }
        guard let first = writable.first else { return }
        let names = replicas[e.replicaOf[first]].snapshotNames
        if names.isEmpty || random.chance(perMille: 650) {
            let name = "s\(nextSnapshot)"
            nextSnapshot += 1
            trace?("\(e.id) takes snapshot \(name): writes held")
            e.gate.holdWrites()
            e.chainChange = .taking(SimEngine.Snapshot(name: name, floor: supersededBefore, durableFloor: durablySupersededBefore,
                                                       requestedAt: clock), waits: 0, left: writable)
            clock += 1
        } else {
            let name = names[random.below(names.count)]
            trace?("\(e.id) removes snapshot \(name)")
            expectedSnapshots[name]?.removalBegun = true
            e.chainChange = .removing(name: name, left: writable)
        }
    }

    /// As the engine's `FreezeHead` call: a replica that is down or gone
    /// fails it and is failed; one a newer engine owns fences this one.
    private func switchHead(of slot: Int, on e: SimEngine, to name: String) {
        guard e.replicas.mode(slot) == .rw else { return }
        let r = replicas[e.replicaOf[slot]]
        if r.running && r.epoch > e.epoch {
            e.replicas.fence(by: slot)
        } else if !e.linkAlive[slot] || !r.running || r.engine != e.id {
            e.replicas.fail(slot, reason: "snapshot \(name) failed")
        } else {
            trace?("\(e.id) snapshot \(name) switched on replica \(e.replicaOf[slot])")
            r.freezeHead(name)
        }
    }

    /// As the engine's status call after the switch: the replica's seal
    /// (its status waits for it); a replica down, gone or unsealed is failed.
    private func awaitSeal(of slot: Int, on e: SimEngine, _ name: String) {
        guard e.replicas.mode(slot) == .rw else { return }
        let r = replicas[e.replicaOf[slot]]
        if e.linkAlive[slot] && r.running && r.engine == e.id {
            r.seal()
            if r.snapshotNames.contains(name) && !r.unsealedSnapshots.contains(name) { return }
        }
        e.replicas.fail(slot, reason: "snapshot \(name) was not sealed")
    }

    /// The create answered: the snapshot reads the volume as of the hold, alike on every replica that took it.
    private func snapshotTaken(_ snapshot: SimEngine.Snapshot, on e: SimEngine) {
        let (name, floor, durableFloor, requestedAt) = (snapshot.name, snapshot.floor, snapshot.durableFloor, snapshot.requestedAt)
        let holders = e.replicas.replicas.indices.filter { e.replicas.mode($0) == .rw }.map { e.replicaOf[$0] }
        guard let first = holders.first, let content = replicas[first].snapshot(name) else { return }
        counts.snapshotsTaken += 1
        for r in holders.dropFirst() where replicas[r].snapshot(name) != content {
            violation("snapshot \(name) reads differently on replicas \(first) and \(r)")
            return
        }
        for b in content.indices {
            if let issued = issuedAt[content[b]], issued > requestedAt {
                violation("snapshot \(name): block \(b) holds generation \(content[b]), issued after the snapshot's writes were held")
            }
            check(block: b, holds: content[b], supersededBefore: floor[b], "snapshot \(name)")
        }
        expectedSnapshots[name] = ExpectedSnapshot(content: content, durableFloor: durableFloor, baseline: baseline)
    }

    /// After a start: every member holds the same snapshots, reading the
    /// same, and each reads what it read when taken (after a power cut: at
    /// least every write acknowledged durable before it was taken).
    func checkSnapshots(members: [Int], afterPowerCut: Bool, epoch: UInt64) {
        let names = replicas[members[0]].snapshotNames
        for i in members.dropFirst() where replicas[i].snapshotNames != names {
            violation("members \(members[0]) and \(i) hold other snapshots after the start at epoch \(epoch): "
                      + "\(names) and \(replicas[i].snapshotNames)")
            return
        }
        if let lost = expectedSnapshots.first(where: { !$0.value.removalBegun && !names.contains($0.key) }) {
            violation("snapshot \(lost.key), acknowledged and never removed, is gone after the start at epoch \(epoch)")
            return
        }
        if let unsealed = members.lazy.flatMap({ self.replicas[$0].unsealedSnapshots }).first {
            violation("snapshot \(unsealed) is unsealed on a member after the start at epoch \(epoch)")
            return
        }
        for name in names {
            let content = replicas[members[0]].snapshot(name)!
            for i in members.dropFirst() where replicas[i].snapshot(name) != content {
                violation("snapshot \(name) reads differently on members \(members[0]) and \(i) after the start at epoch \(epoch)")
                return
            }
            guard var expected = expectedSnapshots[name] else { continue }
            if afterPowerCut {
                for b in content.indices where content[b] != expected.content[b] {
                    guard content[b] == 0 || writtenTo[content[b]]?.contains(b) == true else {
                        violation("snapshot \(name): block \(b) holds generation \(content[b]), never written there (corrupt)")
                        return
                    }
                    let found = expected.baseline[b]
                    let written = content[b] == found.generation ? max(found.at, issuedAt[content[b]]!) : issuedAt[content[b]]!
                    if written < expected.durableFloor[b] {
                        violation("snapshot \(name): block \(b) lost a write acknowledged durable before the snapshot")
                        return
                    }
                }
                expected.content = content
                expectedSnapshots[name] = expected
            } else if content != expected.content {
                violation("snapshot \(name) changed: it reads \(content), it was taken as \(expected.content)")
                return
            }
        }
    }

    /// Between two steps, with no chain change under way: healthy members
    /// hold the same snapshots; where a region is clean, they read the same,
    /// in memory and on disk.
    func checkSnapshotsOfHealthyMembers(_ healthy: [Int], cleanBlocks: [Range<Int>]) -> String? {
        guard engine.chainChange == nil, let first = healthy.first else { return nil }
        let names = replicas[first].snapshotNames
        for i in healthy.dropFirst() {
            guard replicas[i].snapshotNames == names else {
                return "replicas \(first) and \(i) hold other snapshots: \(names) and \(replicas[i].snapshotNames)"
            }
            for name in names {
                for durable in [false, true] {
                    let a = replicas[first].snapshot(name, durable: durable)!, b = replicas[i].snapshot(name, durable: durable)!
                    if let blocks = cleanBlocks.first(where: { a[$0] != b[$0] }) {
                        return "snapshot \(name) differs between replicas \(first) and \(i) in clean blocks \(blocks)"
                            + (durable ? " on disk" : "")
                    }
                }
            }
        }
        return nil
    }
}
