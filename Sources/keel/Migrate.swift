import ArgumentParser
import Foundation
import NodeRegistry
import Volumes

/// `keel migrate`: a volume's migrations (for now, the moves of its replicas: `keel volume move`).
struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follow a volume's migration: its status (none, migrating, migrating_attachable, success, error), phase and progress.",
        subcommands: [Status.self])

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show a volume's current or last migration.",
            discussion: """
                migration_status is none (never migrated), migrating_attachable (its replicas are moving: the \
                volume stays usable), success or error (the last one's result, kept with its time and \
                error until the next starts). A move whose process is gone is shown interrupted: end it \
                with 'keel volume move VOL --cancel'.
                Example: keel migrate status db --watch
                """)

        @OptionGroup var target: VolumeTarget

        @Flag(help: "Follow it until it ends, with a progress bar on a terminal.")
        var watch = false

        func run() throws {
            let node = try Node(target.node)
            _ = try node.volume(target.name)
            guard var record = try node.registry.migration(of: target.name) else {
                if target.json { return try printJSON(["volume": target.name, "migration_status": "none"]) }
                return print("volume \(target.name): migration_status none (never migrated)")
            }
            if watch {
                var progress = MigrationProgress(json: target.json)
                // As long as the migration's process lives; each poll reads the registry once.
                while record.status.isRunning && node.isAlive(record) {
                    progress.show(record)
                    usleep(250_000)
                    guard let next = try node.registry.migration(of: target.name) else { break }
                    record = next
                }
                progress.finish()
            }
            let interrupted = record.status.isRunning && !node.isAlive(record)
            if target.json { return try printJSON(MigrationProgress.object(record, interrupted: interrupted)) }
            print(Self.describe(record, interrupted: interrupted))
        }

        static func describe(_ record: MigrationRecord, interrupted: Bool) -> String {
            let started = Date(timeIntervalSince1970: TimeInterval(record.startedAt))
            var text = "volume \(record.volume): migration_status \(record.status.rawValue)"
                + (interrupted ? " (interrupted: its process is gone; end it with 'keel volume move \(record.volume) --cancel')" : "")
                + "\n  \(record.kind == ReplicaMove.kind ? "move of its replicas" : "migration") to \(record.target), "
                + "started \(ISO8601DateFormatter().string(from: started))"
                + "\n  phase \(record.phase), \(record.percent)% (\(record.bytesDone) of \(record.bytesTotal) bytes)"
            if !record.error.isEmpty { text += "\n  error: \(record.error)" }
            return text
        }
    }
}

extension MigrationRecord.Status: ExpressibleByArgument {}
