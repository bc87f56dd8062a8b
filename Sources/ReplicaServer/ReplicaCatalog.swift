import Logging
import NBDProtocol
import ReplicaIdentity
import ReplicaStore

/// A replica exports its head only to engines that name their volume, epoch
/// and themselves (`ReplicaExportName`). Opening with a newer epoch claims
/// the replica (durably, before the answer); an older epoch is refused, and
/// so is the current one from another engine, and any engine of another volume.
/// `<volume>@snapshot:<name>` opens a snapshot read-only and claims nothing;
/// `<volume>@standby:<epoch>+<engine>` opens a session that waits for that claim.
struct ReplicaCatalog: ExportCatalog {
    let store: ReplicaStore
    let fence: EpochFence
    let sessions: EngineSessions
    let logger: Logger

    /// The current claim: how an engine learns the epoch it has to outbid, and the volume.
    var listed: [ExportDescription] {
        [ExportDescription(name: "\(store.listedName)", description: "Keel replica", size: store.size, readOnly: false)]
    }

    func resolve(_ name: String, opening: Bool) -> ExportResolution {
        if let snapshot = SnapshotExportName(parsing: name) { return resolve(snapshot, name: name) }
        guard let export = ReplicaExportName(parsing: name) else {
            return .refused(.errPolicy, "a Keel replica serves only '<volume>@<epoch>+<engine>' exports to its engine, not '\(name)'")
        }
        if opening && export.volume.name.isEmpty {
            return .refused(.errPolicy, "an engine names its volume: '<volume>@<epoch>+<engine>', not '\(name)'")
        }
        if let refusal = store.volume.refusal(of: export.volume) {
            return .refused(.errPolicy, refusal)
        }
        let current = store.epoch
        let epoch = export.owner.epoch
        if opening && export.standby {
            // Waits for its engine's claim: it must be able to outbid the owner, and it claims nothing.
            guard !export.owner.engine.isEmpty else {
                return .refused(.errPolicy, "a standby session names its engine: '<volume>@standby:<epoch>+<engine>'")
            }
            guard epoch > current else {
                return .refused(.errPolicy, "a standby session of epoch \(epoch) could never be claimed: this replica is at epoch \(current)")
            }
        } else if opening {
            do { try ReplicaClaim(store: store, fence: fence, logger: logger).claim(export.owner, volume: export.volume) } catch {
                switch error {
                case .policy(let reason): return .refused(.errPolicy, reason)
                case .platform(let reason): return .refused(.errPlatform, reason)
                }
            }
        } else if epoch < current {
            return refusal(epoch, current)
        }
        // What changed since each snapshot, up to the head: a rebuild copies only that.
        let changedSince = ((try? store.snapshots()) ?? []).map {
            MetaContextOffer(name: ChangedBlocksContext.name(since: $0.name), id: ChangedBlocksContext.replicaID(layer: $0.layer))
        }
        return .found(ExportDescription(name: name, size: store.size, readOnly: false, session: epoch, metaContexts: changedSince))
    }

    private func resolve(_ export: SnapshotExportName, name: String) -> ExportResolution {
        if let refusal = store.volume.refusal(ofReaderOf: export.volume) {
            return .refused(.errPolicy, refusal)
        }
        let snapshots: [SnapshotRecord]
        do { snapshots = try store.snapshots() } catch {
            return .refused(.errPlatform, "the replica cannot read its snapshots: \(error)")
        }
        guard let snapshot = snapshots.first(where: { $0.name == export.snapshot }) else {
            let known = snapshots.map(\.name).joined(separator: ", ")
            return .refused(.errUnknown, "volume \(export.volume) has no snapshot '\(export.snapshot)' (it has: \(known.isEmpty ? "none" : known))")
        }
        let changedSince = snapshots.filter { $0.layer < snapshot.layer }.map {
            MetaContextOffer(name: ChangedBlocksContext.name(since: $0.name), id: ChangedBlocksContext.replicaID(layer: $0.layer))
        }
        return .found(ExportDescription(name: name, description: "Keel snapshot", size: store.size, readOnly: true,
                                        session: ReplicaSession.snapshot(layer: snapshot.layer).raw,
                                        metaContexts: changedSince))
    }

    func transmissionStarted(_ export: ExportDescription) { sessions.started(export) }
    func transmissionEnded(_ export: ExportDescription) { sessions.ended(export) }

    private func refusal(_ epoch: UInt64, _ current: UInt64) -> ExportResolution {
        .refused(.errPolicy, ReplicaClaim.stale(epoch, current))
    }
}
