import BackupStore
import ControlAPI
import Foundation
import Logging
import ReplicaIdentity
import Syscalls
import Volumes

/// A restore into a volume of this node, written once through its engine (the engine
/// replicates it): into a new volume, or incrementally onto a volume restored earlier from
/// an older backup of the same volume. The restore point is a snapshot `restored-<id>`:
/// the next incremental restore reads the volume's changes since it (there must be none).
struct VolumeRestore {
    let store: BackupStore
    let summary: BackupSummary
    let volume: String
    let node: Node
    let credentials: ControlCredentials
    let timeout: Double
    let parallel: Int
    let display: ProgressDisplay

    static func restorePoint(of id: String) -> String { "restored-" + id.dropFirst("bk-".count).lowercased() }

    /// Creates the volume with the backup's size, restores into it, and leaves it detached; on failure the volume goes again.
    func intoNewVolume(replicas: Int) throws -> RestoreReport {
        _ = try Backup.storeCall { try store.map(summary.id) }  // a missing map is told before a volume is made
        _ = try node.createVolume(VolumeSpec(name: volume, size: summary.size, replicas: replicas), credentials: credentials)
        do {
            let engine = try JobEngine(node: node, volume: volume, timeout: timeout)
            defer { engine.release() }
            let empty = BlockMap(id: "", size: summary.size, blockSize: summary.blockSize, blocks: [])
            let report = try write(through: engine, baseline: empty)
            try markRestorePoint(engine, replacing: nil)
            return report
        } catch {
            _ = try? node.removeVolume(volume, credentials: credentials)
            throw error
        }
    }

    /// Moves only the blocks that differ from the backup the volume was restored from; refused when the
    /// volume was written since that restore. On failure the volume is reverted to its restore point.
    func ontoRestoredVolume() throws -> RestoreReport {
        let record = try node.volume(volume)
        if let device = node.attachment(record).device {
            throw KeelError("volume \(volume) is attached as \(device); unmount it and run 'keel volume detach \(volume)' before restoring onto it")
        }
        let engine = try JobEngine(node: node, volume: volume, timeout: timeout)
        defer { engine.release() }
        let snapshots = try callEngine(engine.control, doing: "list its snapshots") { try await $0.listSnapshots(.init()) }.snapshots.map(\.name)
        let backups = try Backup.storeCall { try store.backups() }
        guard let base = backups.last(where: { snapshots.contains(Self.restorePoint(of: $0.id)) }) else {
            throw KeelError("volume \(volume) has no restore point of a backup in \(store.target.url) (a restored-… snapshot); "
                + "restore into a new volume instead (--to-volume NEW without --incremental)")
        }
        guard base.volume == summary.volume, base.size == summary.size, base.blockSize == summary.blockSize else {
            throw KeelError("volume \(volume) was restored from backup \(base.id) of volume \(base.volume); \(summary.id) is a backup of "
                + "\(summary.volume)\(base.size == summary.size ? "" : " of another size"): restore it into a new volume")
        }
        guard base.id < summary.id else {
            throw KeelError("volume \(volume) was restored from \(base.id), newer than \(summary.id); restore that one into a new volume")
        }
        let restorePoint = Self.restorePoint(of: base.id)
        if let written = try writtenSince(restorePoint, engine: engine) {
            throw KeelError("volume \(volume) was written since its restore from \(base.id) (\(written)); "
                + "an incremental restore would mix the two: restore \(summary.id) into a new volume")
        }
        let baseline = try Backup.storeCall { try store.map(base.id) }
        do {
            let report = try write(through: engine, baseline: baseline)
            try markRestorePoint(engine, replacing: restorePoint)
            return report
        } catch {
            // Nothing half-made: the volume goes back to what the older backup held.
            try? snapshotCall(engine, doing: "revert to \(restorePoint)") { try await $0.revertSnapshot(.with { $0.name = restorePoint }) }
            throw error
        }
    }

    private func write(through engine: JobEngine, baseline: BlockMap) throws -> RestoreReport {
        var restorer = BackupRestorer(store: store, id: summary.id)
        restorer.parallel = parallel
        restorer.baseline = baseline
        let uri = "nbd+unix:///\(volume)?socket=\(node.layout.engineSocket(volume))"
        return try Backup.storeCall { try restorer.run(to: .nbd(uri), progress: display.show) }
    }

    private func markRestorePoint(_ engine: JobEngine, replacing old: String?) throws {
        let point = Self.restorePoint(of: summary.id)
        try snapshotCall(engine, doing: "take the restore point \(point)") { try await $0.createSnapshot(.with { $0.name = point }) }
        if let old { try? snapshotCall(engine, doing: "remove \(old)") { try await $0.removeSnapshot(.with { $0.name = old }) } }
    }

    /// A snapshot call on the volume's engine; its answer is kept in the registry (keel snapshot ls of a detached volume).
    private func snapshotCall(_ engine: JobEngine, doing what: String,
                              _ body: @escaping @Sendable (EngineStub) async throws -> Keel_Control_V1_Snapshots) throws {
        node.remember(try callEngine(engine.control, doing: what, body).snapshots, of: volume)
    }

    /// Removes a snapshot of this command's own; the export that read it may still be letting go of it
    /// (a removal is refused while it reads), so it tries again for up to 10 s.
    private func removeSoon(_ snapshot: String, engine: JobEngine) {
        let deadline = Date().addingTimeInterval(10)
        repeat {
            if (try? snapshotCall(engine, doing: "remove \(snapshot)") { try await $0.removeSnapshot(.with { $0.name = snapshot }) }) != nil {
                return
            }
            usleep(200_000)
        } while Date() < deadline
    }

    /// What was written since the snapshot, read from a snapshot of the volume as it is now (nil: nothing).
    private func writtenSince(_ restorePoint: String, engine: JobEngine) throws -> String? {
        let now = "restore-check-" + BackupID.make().dropFirst("bk-".count).lowercased()
        try snapshotCall(engine, doing: "take snapshot \(now)") { try await $0.createSnapshot(.with { $0.name = now }) }
        defer { removeSoon(now, engine: engine) }
        let replicas = try callEngine(engine.control, doing: "report its replicas") { try await $0.status(.init()) }.replicas
            .map { try parseListenAddress($0.address, option: "--replica") }
        let logger = makeLogger(label: "keel.restore", level: .warning)
        return try PrivateSnapshotExport.serve(volume: volume, snapshot: now, changedSince: restorePoint, replicas: replicas,
                                               logger: logger) { export in
            let source = try Backup.storeCall { try NBDBackupSource(uri: export.uri) }
            guard let changed = try Backup.storeCall({ try source.changedBlocks(since: restorePoint, blockSize: summary.blockSize) }) else {
                return "its changes since \(restorePoint) cannot be read"
            }
            return changed.isEmpty ? nil : "\(changed.count) block(s) of \(humanSize(UInt64(summary.blockSize))) changed"
        }
    }
}
