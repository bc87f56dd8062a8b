import LayerStack
import ReplicaIdentity
import ReplicaStore

/// Reverting to a snapshot: the head, and with `discardNewer` the snapshots
/// newer than it, are discarded; an empty head starts on the snapshot. The
/// records change in one transaction that also marks the whole volume dirty
/// (`ReplicaStore.revert`); then, with the data path held, the chain in
/// memory; then the discarded files go. A crash after the transaction leaves
/// files the next open removes.
extension ReplicaDevice {
    /// A change of the chain failed before anything changed on this replica.
    public struct Unchanged: Error, CustomStringConvertible {
        public let description: String
    }

    public func revert(toSnapshot name: String, discardNewer: Bool, owner: Owner?, checkOnly: Bool) throws {
        try chainWork.sync {
            try store.checkOwner(owner)
            let snapshots = try store.snapshots()
            guard let k = snapshots.firstIndex(where: { $0.name == name }) else {
                throw ReplicaStore.SnapshotFailure.unknown(name)
            }
            let newer = snapshots[(k + 1)...]
            if !newer.isEmpty && !discardNewer {
                throw ReplicaStore.SnapshotFailure.newerSnapshots(name, newer.map(\.name))
            }
            for snapshot in newer {
                let readers = sessions.connections(epoch: ReplicaSession.snapshot(layer: snapshot.layer).raw)
                if readers > 0 { throw ReplicaStore.SnapshotFailure.beingRead(snapshot.name, connections: readers) }
            }
            if checkOnly { return }

            let discarded: [LayerRecord]
            do {
                let newHead = try spare ?? store.makeHeadFiles()
                spare = nil
                prepared = nil  // a snapshot prepared and never switched to is abandoned
                try chain.prepare(newHead: newHead.id, files: newHead.files)
                discarded = try store.revert(to: snapshots[k], newHead: newHead, owner: owner)
            } catch {
                throw Unchanged(description: "the revert failed before anything changed: \(error)")
            }
            guard fence.hold(seconds: 5) else {
                // The records say reverted, memory does not: serve nothing until a restart reads the records.
                fence.breakForGood()
                throw SnapshotError(description: "requests in flight did not finish within 5 s; restart the replica to finish the revert")
            }
            chain.revert(to: snapshots[k].layer)
            fence.release()
            for layer in discarded { try? layer.files.remove() }
        }
        chainWork.async { [self] in
            if spare == nil { spare = try? store.makeHeadFiles() }
        }
    }
}
