import ArgumentParser
import BackupStore
import Foundation
import NodeRegistry
import Volumes

extension Backup {
    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Restore a backup into a new volume, a new file or an NBD export: each block checked against its hash, zero blocks left as holes.",
            discussion: """
                --to-volume NEW creates the volume (the backup's size, --replicas replicas on this node), writes the \
                backup once through its engine and leaves it detached, with a restore point (snapshot restored-…). \
                --to-volume EXISTING --incremental moves only the blocks that differ from the older backup of the same \
                volume it was restored from; refused if it was written since.
                Examples: keel backup restore ID --target file:///mnt/backups --to-volume db-copy
                          keel backup restore NEWER-ID --target file:///mnt/backups --to-volume db-copy --incremental
                          keel backup restore ID --target file:///mnt/backups --to /var/tmp/db.img
                          keel backup restore ID --target file:///mnt/backups --to nbd+unix:///db?socket=/run/db.sock
                """)

        @Argument(help: "The backup's id (see keel backup ls).")
        var id: String

        @OptionGroup var store: Store

        @Option(help: "A new file, or an NBD URI (nbd://, nbds://, nbd+unix://) at least as large as the volume.")
        var to: String?

        @Option(name: .customLong("to-volume"), help: ArgumentHelp("A new volume of this node (or, with --incremental, one restored earlier from an older backup of the same volume).", valueName: "name"))
        var toVolume: String?

        @Flag(help: "With --to-volume: restore onto the volume restored earlier, moving only what changed between the backups.")
        var incremental = false

        @Option(help: "Replicas of the new volume (--to-volume), on this node.")
        var replicas = 3

        @Option(help: "Blocks fetched and written at once.")
        var parallel = 8

        @Option(help: "Seconds to wait for the volume's engine to serve.")
        var timeout: Double = 120

        @Flag(help: "Print JSON progress lines and the result.")
        var json = false

        @OptionGroup var node: NodeOptions

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            guard (to == nil) != (toVolume == nil) else { throw ValidationError("give one destination: --to FILE|NBD-URI or --to-volume NAME") }
            if incremental && toVolume == nil { throw ValidationError("--incremental restores onto a volume: give --to-volume NAME") }
            if let toVolume, let problem = VolumeRecord.validate(name: toVolume) { throw ValidationError(problem) }
            guard (1 ... 16).contains(replicas) else { throw ValidationError("a volume has 1 to 16 replicas") }
            guard (1 ... 64).contains(parallel) else { throw ValidationError("--parallel must be between 1 and 64") }
        }

        func run() throws {
            let backupStore = try store.open()
            let display = ProgressDisplay(json: json)
            let report: RestoreReport
            let destination: String
            if let toVolume {
                control.apply()
                let node = try Node(self.node)
                if !incremental, (try? node.volume(toVolume)) != nil {
                    throw KeelError("volume \(toVolume) exists; restore into a new volume, or onto it with --incremental if it was restored from an older backup")
                }
                let restore = VolumeRestore(store: backupStore, summary: try storeCall { try backupStore.summary(id) }, volume: toVolume,
                                            node: node, credentials: control.credentials, timeout: timeout, parallel: parallel, display: display)
                report = try incremental ? restore.ontoRestoredVolume() : restore.intoNewVolume(replicas: replicas)
                destination = "volume \(toVolume)"
            } else {
                let to = to!
                var restorer = BackupRestorer(store: backupStore, id: id)
                restorer.parallel = parallel
                report = try storeCall { try restorer.run(to: to.hasPrefix("nbd") ? .nbd(to) : .file(to), progress: display.show) }
                destination = to
            }
            display.finish()
            if json {
                return try printJSON(["id": id, "to": to ?? NSNull(), "to_volume": toVolume ?? NSNull(), "incremental": incremental,
                                      "blocks_written": report.blocksWritten, "bytes_written": report.bytesWritten,
                                      "blocks_zeroed": report.blocksZeroed])
            }
            print("backup \(id) restored to \(destination)" + (incremental ? " incrementally" : "")
                + ": \(report.blocksWritten) block(s) written (\(humanSize(report.bytesWritten))), \(report.blocksZeroed) zeroed"
                + (toVolume.map { incremental ? "" : "; attach it with keel volume attach \($0)" } ?? ""))
        }
    }
}
