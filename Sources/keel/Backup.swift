import ArgumentParser
import BackupStore
import ControlAPI
import Foundation
import Syscalls
import Volumes
#if canImport(Glibc)
import Glibc
#endif

struct Backup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Incremental, content-addressed backups of volumes to a directory (file:///path) or S3 (s3://bucket/prefix).",
        discussion: """
            A store holds 2 MiB blocks named by their SHA-256 and compressed with zstd, shared by every \
            backup and every volume in it, and one block map per backup (docs/backups.md).
            Examples: keel backup create db --target file:///mnt/backups
                      keel backup ls --target file:///mnt/backups db
                      keel backup restore bk-20261204T101500123Z-3fa2c1 --target file:///mnt/backups --to /tmp/db.img
            """,
        subcommands: [Create.self, List.self, Show.self, Remove.self, Verify.self, GC.self, Restore.self, Schedule.self])

    struct Store: ParsableArguments {
        @Option(help: "The backup store: file:///path/to/dir or s3://bucket/prefix.")
        var target: String

        func open(create: Bool = false) throws -> BackupStore {
            do { return try BackupStore.open(try openBackupTarget(target), create: create) } catch let error as KeelError {
                throw error
            } catch {
                throw KeelError("\(error)")
            }
        }
    }

    static func summaryJSON(_ summary: BackupSummary) -> [String: Any] {
        ["id": summary.id, "volume": summary.volume, "size": summary.size, "snapshot": summary.snapshot,
         "created": Snapshot.List.time(summary.created), "created_unix": summary.created,
         "parent": summary.parent ?? NSNull(), "block_size": summary.blockSize, "blocks": summary.blocks,
         "new_blocks": summary.newBlocks, "bytes_read": summary.bytesRead, "bytes_sent": summary.bytesSent,
         "incremental": summary.incremental, "schedule": summary.schedule ?? NSNull()]
    }

    /// Runs a store operation, its failure phrased as one line.
    static func storeCall<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as KeelError { throw error } catch { throw KeelError("\(error)") }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the store's backups (of VOL), oldest first.")

        @OptionGroup var store: Store

        @Argument(help: "Only this volume's backups.")
        var volume: String?

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let backups = try storeCall { try store.open().backups(of: volume) }
            if json { return try printJSON(backups.map(summaryJSON)) }
            guard !backups.isEmpty else {
                return print("no backup\(volume.map { " of \($0)" } ?? "") in \(store.target)")
            }
            print("ID                               VOLUME        CREATED (UTC)         SIZE        SENT        SNAPSHOT")
            for backup in backups {
                print(backup.id.padding(toLength: 31, withPad: " ", startingAt: 0) + "  "
                    + backup.volume.padding(toLength: 12, withPad: " ", startingAt: 0) + "  "
                    + Snapshot.List.time(backup.created).padding(toLength: 20, withPad: " ", startingAt: 0) + "  "
                    + humanSize(backup.size).padding(toLength: 10, withPad: " ", startingAt: 0) + "  "
                    + humanSize(backup.bytesSent).padding(toLength: 10, withPad: " ", startingAt: 0) + "  " + backup.snapshot)
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one backup: its volume, snapshot, parent, blocks and bytes.")

        @Argument(help: "The backup's id (see keel backup ls).")
        var id: String

        @OptionGroup var store: Store

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let summary = try storeCall { try store.open().summary(id) }
            let fields = summaryJSON(summary)
            if json { return try printJSON(fields) }
            for key in fields.keys.sorted() { print("\(key): \(fields[key]!)") }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Remove a backup; no other backup needs it. Its blocks are freed by keel backup gc.")

        @Argument(help: "The backup's id (see keel backup ls).")
        var id: String

        @OptionGroup var store: Store

        func run() throws {
            try storeCall { try store.open().remove(id) }
            print("backup \(id) removed; run keel backup gc --target \(store.target) to free its blocks")
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check that every block the backups (or BACKUP) name exists and hashes right; names what is missing or corrupt.")

        @Argument(help: "Only this backup.")
        var id: String?

        @OptionGroup var store: Store

        @Flag(help: "Only check that the blocks exist.")
        var quick = false

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let report = try storeCall { try store.open().verify(id, quick: quick) }
            if json {
                try printJSON(["backups": report.backups, "blocks_checked": report.blocksChecked,
                               "missing": report.missing.map { ["block": $0.key.hex, "backups": $0.value] },
                               "corrupt": report.corrupt.map { ["block": $0.key.hex, "backups": $0.value] }])
            } else {
                for (hash, backups) in report.missing.sorted(by: { $0.key < $1.key }) {
                    print("missing block \(hash), named by \(backups.joined(separator: ", "))")
                }
                for (hash, backups) in report.corrupt.sorted(by: { $0.key < $1.key }) {
                    print("corrupt block \(hash), named by \(backups.joined(separator: ", "))")
                }
                print("\(report.backups.count) backup(s), \(report.blocksChecked) block(s) checked\(quick ? " (existence only)" : ""): "
                    + (report.isClean ? "all sound" : "\(report.missing.count) missing, \(report.corrupt.count) corrupt"))
            }
            if !report.isClean { throw ExitCode(3) }
        }
    }

    struct GC: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "gc", abstract: "Free the blocks no backup names (refused while a backup runs on the store).")

        @OptionGroup var store: Store

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            let host = ProcessInfo.processInfo.hostName
            let report = try storeCall { try store.open().collectGarbage(holder: "keel backup gc, pid \(getpid()) on \(host)") }
            if json {
                return try printJSON(["backups_kept": report.backupsKept, "blocks_kept": report.blocksKept,
                                      "blocks_freed": report.blocksFreed, "bytes_freed": report.bytesFreed,
                                      "unfinished_maps_removed": report.orphanMapsRemoved, "stale_locks_removed": report.staleLocksRemoved,
                                      "uploads_aborted": report.uploadsAborted])
            }
            print("freed \(report.blocksFreed) block(s), \(humanSize(UInt64(report.bytesFreed))); kept \(report.blocksKept) block(s) "
                + "of \(report.backupsKept) backup(s); removed \(report.orphanMapsRemoved) unfinished map(s), \(report.staleLocksRemoved) stale lock(s); "
                + "aborted \(report.uploadsAborted) unfinished upload(s)")
        }
    }
}
