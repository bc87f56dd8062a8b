import ArgumentParser
import BackupStore
import ControlAPI
import Foundation
import Logging
import ReplicaIdentity
import Syscalls
import Volumes

extension Backup {
    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Back up a volume: snapshot it, read only what changed since its last backup in the store, store the blocks the store lacks.",
            discussion: """
                The snapshot taken (backup-ID) stays until the volume's next backup in this store, which \
                reads only the blocks changed since it; if it was removed, the next backup reads the whole \
                volume and says so. Example: keel backup create db --target file:///mnt/backups
                """)

        @OptionGroup var snapshotTarget: Snapshot.Target

        @OptionGroup var store: Store

        @Option(help: "Back up this existing snapshot instead of taking one.")
        var snapshot: String?

        @Option(help: "Blocks read and stored at once.")
        var parallel = 4

        func validate() throws {
            if let snapshot, !SnapshotName.isValid(snapshot) {
                throw ValidationError("'\(snapshot)' is not a snapshot name: use \(SnapshotName.rule)")
            }
            guard (1 ... 64).contains(parallel) else { throw ValidationError("--parallel must be between 1 and 64") }
        }

        func run() throws {
            let volume = snapshotTarget.volume
            let logger = makeLogger(label: "keel.backup", level: .warning)
            let backupStore = try store.open(create: true)
            let control = try snapshotTarget.engineControl()
            let replicas = try callEngine(control, doing: "report its replicas") { try await $0.status(.init()) }.replicas
                .map { try parseListenAddress($0.address, option: "--replica") }
            guard !replicas.isEmpty else { throw KeelError("volume \(volume) has no replica to back up from") }

            let writerID = BackupID.make()
            let snapshotName = snapshot ?? "backup-" + writerID.dropFirst("bk-".count).lowercased()
            if snapshot == nil {
                try callEngine(control, doing: "take snapshot \(snapshotName) for the backup") {
                    _ = try await $0.createSnapshot(.with { $0.name = snapshotName })
                }
            }
            let display = ProgressDisplay(json: snapshotTarget.json)
            let outcome = Result { () throws -> (BackupSummary, String?) in
                try PrivateSnapshotExport.serve(volume: volume, snapshot: snapshotName, replicas: replicas, logger: logger) { export in
                    let source = try storeCall { try NBDBackupSource(uri: export.uri) }
                    let latest = try storeCall { try backupStore.backups(of: volume) }.last
                    var parent: BackupParent?
                    var fullReadReason: String?
                    if let latest {
                        if export.olderSnapshots.contains(latest.snapshot),
                           let changed = try storeCall({ try source.changedBlocks(since: latest.snapshot, blockSize: backupStore.config.blockSize) }) {
                            parent = BackupParent(summary: latest, map: try storeCall { try backupStore.map(latest.id) }, changed: changed)
                        } else {
                            fullReadReason = "snapshot \(latest.snapshot) of the last backup (\(latest.id)) is gone: reading the whole volume"
                        }
                    }
                    if let fullReadReason, !snapshotTarget.json { FileHandle.standardError.write(Data("keel: \(fullReadReason)\n".utf8)) }
                    var writer = BackupWriter(store: backupStore, source: source, volume: volume, snapshot: snapshotName,
                                              snapshotTakenForBackup: snapshot == nil, parent: parent)
                    writer.parallel = parallel
                    writer.id = writerID
                    let summary = try storeCall { try writer.run(progress: display.show) }
                    return (summary, fullReadReason)
                }
            }
            display.finish()
            let (summary, fullReadReason): (BackupSummary, String?)
            do { (summary, fullReadReason) = try outcome.get() } catch {
                // Nothing half-made stays: the snapshot this run took goes too.
                if snapshot == nil {
                    _ = try? callEngine(control, doing: "remove snapshot \(snapshotName)") {
                        try await $0.removeSnapshot(.with { $0.name = snapshotName })
                    }
                }
                throw error
            }
            // The parent's snapshot served its turn: the next incremental starts from this one.
            if let parentID = summary.parent, let parent = try? backupStore.summary(parentID), parent.snapshotTakenForBackup,
               parent.snapshot != summary.snapshot {
                _ = try? callEngine(control, doing: "remove snapshot \(parent.snapshot)") {
                    try await $0.removeSnapshot(.with { $0.name = parent.snapshot })
                }
            }
            if snapshotTarget.json {
                var fields = summaryJSON(summary)
                fields["full_read_reason"] = fullReadReason ?? NSNull()
                return try printJSON(fields)
            }
            print("backup \(summary.id) of \(volume) (snapshot \(summary.snapshot)) made: "
                + (summary.incremental ? "incremental from \(summary.parent!)" : "full")
                + "; read \(humanSize(summary.bytesRead)), sent \(humanSize(summary.bytesSent)), \(summary.newBlocks) new block(s) of \(summary.blocks)")
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Restore a backup into a new file or an NBD export: each block checked against its hash, zero blocks left as holes.",
            discussion: """
                Examples: keel backup restore ID --target file:///mnt/backups --to /var/tmp/db.img
                          keel backup restore ID --target file:///mnt/backups --to nbd+unix:///db?socket=/run/db.sock
                """)

        @Argument(help: "The backup's id (see keel backup ls).")
        var id: String

        @OptionGroup var store: Store

        @Option(help: "A new file, or an NBD URI (nbd://, nbds://, nbd+unix://) at least as large as the volume.")
        var to: String

        @Option(help: "Blocks fetched and written at once.")
        var parallel = 4

        @Flag(help: "Print JSON progress lines and the result.")
        var json = false

        func run() throws {
            let destination: RestoreDestination = to.hasPrefix("nbd") ? .nbd(to) : .file(to)
            let backupStore = try store.open()
            var restorer = BackupRestorer(store: backupStore, id: id)
            restorer.parallel = parallel
            let display = ProgressDisplay(json: json)
            try storeCall { try restorer.run(to: destination, progress: display.show) }
            display.finish()
            if json { return try printJSON(["id": id, "to": to]) }
            print("backup \(id) restored to \(to)")
        }
    }
}
