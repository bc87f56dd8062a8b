import ArgumentParser
import Foundation
import NodeRegistry
import Volumes

/// `keel migrate`: a volume's migrations (for now, the moves of its replicas: `keel volume move`).
struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate a volume's engine live (start, confirm, rollback) and follow any migration: its status (none, migrating, migrating_attachable, success, error), phase and progress.",
        subcommands: [Start.self, Confirm.self, Rollback.self, Status.self])

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
            let ending = record.kind == ReplicaMove.kind ? "keel volume move \(record.volume) --cancel" : "keel migrate rollback \(record.volume)"
            let started = Date(timeIntervalSince1970: TimeInterval(record.startedAt))
            var text = "volume \(record.volume): migration_status \(record.status.rawValue)"
                + (interrupted ? " (interrupted: its process is gone; end it with '\(ending)')" : "")
                + "\n  \(record.kind == ReplicaMove.kind ? "move of its replicas" : "migration of its engine") to \(record.target), "
                + "started \(ISO8601DateFormatter().string(from: started))"
                + "\n  phase \(record.phase), \(record.percent)%"
                + (record.kind == ReplicaMove.kind ? " (\(record.bytesDone) of \(record.bytesTotal) bytes)" : "")
            if !record.error.isEmpty { text += "\n  error: \(record.error)" }
            return text
        }
    }
}

extension MigrationRecord.Status: ExpressibleByArgument {}

extension Migrate {
    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Start a live migration of a volume's engine: engine B stands by beside engine A.",
            discussion: """
                Engine B opens its sessions to every replica and claims nothing: A serves on, undisturbed. \
                Confirm with 'keel migrate confirm VOL' (the switch holds the device's I/O for a moment), or \
                roll back with 'keel migrate rollback VOL'. The same node with --binary is a live upgrade. \
                The volume must be attached with --mapper (or detached with its engine running).
                Example: keel migrate start db --binary /opt/keel-1.1/keel
                """)

        @OptionGroup var target: VolumeTarget

        @Option(help: "The registered node (keel node add) to run engine B on, through its agent: for a volume whose engine runs on engine nodes (default: this node, for a volume whose engine runs here).")
        var to: String?

        @Option(help: "The keel executable engine B runs (default: this one).")
        var binary: String?

        @Option(help: "Seconds to wait for engine B to stand by.")
        var timeout: Double = 120

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply()
            let node = try Node(target.node)
            let record = try EngineMigration(node: node, volume: target.name).start(binary: binary, to: to, timeout: timeout)
            if target.json { return try printJSON(MigrationProgress.object(record, interrupted: false)) }
            print("migration of \(target.name) to \(record.target) started: engine B stands by; "
                  + "confirm it with 'keel migrate confirm \(target.name)' or roll it back with 'keel migrate rollback \(target.name)'; "
                  + "follow it with 'keel migrate status \(target.name)'")
        }
    }

    struct Confirm: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Switch the volume to engine B: the device's I/O held, A stopped, B claims the replicas, the device switched.",
            discussion: """
                Refused, with the reason, when no migration stands by or engine B is not ready. If B cannot \
                take over, the volume goes on with engine A (started again) and the migration ends in error.
                Example: keel migrate confirm db
                """)

        @OptionGroup var target: VolumeTarget

        @Option(help: "Seconds at most the device's I/O is held (it goes on by itself after that).")
        var hold: Double = 30

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            guard hold > 0 && hold <= 600 else { throw ValidationError("--hold must be above 0 and at most 600 seconds") }
        }

        func run() throws {
            control.apply()
            let node = try Node(target.node)
            let confirmed = try EngineMigration(node: node, volume: target.name).confirm(holdSeconds: hold)
            if target.json {
                var object = MigrationProgress.object(confirmed.record, interrupted: false)
                object["epoch"] = confirmed.epoch ?? NSNull()
                object["held_milliseconds"] = confirmed.heldMilliseconds ?? NSNull()
                object["already_on_b"] = confirmed.alreadyOnB
                return try printJSON(object)
            }
            if confirmed.alreadyOnB {
                return print("volume \(target.name) already runs on engine B: engine A was lost during the migration and B took over")
            }
            print("volume \(target.name) runs on engine B (epoch \(confirmed.epoch ?? 0))"
                  + (confirmed.heldMilliseconds.map { "; the device's I/O was held \($0) ms" } ?? "; it has no device attached"))
        }
    }

    struct Rollback: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Give up a migration that stands by: engine B goes away, engine A serves on.",
            discussion: "Example: keel migrate rollback db")

        @OptionGroup var target: VolumeTarget

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            control.apply()
            let node = try Node(target.node)
            let record = try EngineMigration(node: node, volume: target.name).rollback()
            if target.json { return try printJSON(MigrationProgress.object(record, interrupted: false)) }
            print("migration of \(target.name) rolled back: \(record.error.replacingOccurrences(of: "rolled back: ", with: ""))")
        }
    }
}
