import ArgumentParser
import ControlAPI
import Foundation
import NodeRegistry
import Volumes

/// What `ls`, `show` and `create --json` say about a volume.
struct VolumeReport {
    let record: VolumeRecord
    let attachment: Node.Attachment
    let replicasRunning: [Bool?]
    let migration: MigrationRecord?
    /// Recorded as running, its process gone.
    let migrationInterrupted: Bool

    init(_ record: VolumeRecord, node: Node) {
        self.record = record
        attachment = node.attachment(record)
        let runner = node.runner(record.runner)
        var daemons = node.localReplicas(record).map(\.daemon).makeIterator()
        replicasRunning = record.replicas.map { $0.isLocal ? daemons.next().map(runner.isRunning) : nil }
        migration = try? node.registry.migration(of: record.name)
        migrationInterrupted = migration.map { $0.status.isRunning && !node.isAlive($0) } ?? false
    }

    var migrationStatus: MigrationRecord.Status { migration?.status ?? .none }

    /// For `ls`: "migrating_attachable 40%", "success", "none".
    var migrationSummary: String {
        guard let migration else { return "none" }
        if migrationInterrupted { return "\(migration.status.rawValue) (interrupted)" }
        return migration.status.isRunning ? "\(migration.status.rawValue) \(migration.percent)%" : migration.status.rawValue
    }

    var json: [String: Any] {
        [
            "name": record.name, "id": record.id, "size": record.size, "connections": record.connections,
            "runner": record.runner.rawValue, "created_at": record.createdAt,
            "state": attachment.summary, "device": attachment.device ?? NSNull(), "link": attachment.link ?? NSNull(),
            "engine_running": attachment.engineRunning, "frontend_running": attachment.frontendRunning,
            "replicas": zip(record.replicas, replicasRunning).map { replica, running in
                ["address": replica.address, "local": replica.isLocal, "directory": replica.directory ?? NSNull(),
                 "node": replica.node ?? NSNull(), "running": running ?? NSNull(), "role": replica.role.rawValue] as [String: Any]
            },
            "migration_status": migrationStatus.rawValue,
            "migration": migration.map { MigrationProgress.object($0, interrupted: migrationInterrupted) } ?? NSNull(),
            "engine_nodes": record.engineNodes,
            "engine_port": record.enginePlacedElsewhere ? record.enginePort : NSNull(),
            "frontend": attachment.frontend?.json ?? NSNull(),
        ]
    }
}

extension Volume {
    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List this node's volumes.")

        @Flag(help: "Print JSON.")
        var json = false

        @Option(help: ArgumentHelp("Only the volumes whose migration has this status: none, migrating, migrating_attachable, success, error.", valueName: "status"))
        var migrationStatus: MigrationRecord.Status?

        @OptionGroup var node: NodeOptions

        func run() throws {
            let node = try Node(self.node)
            let reports = try node.registry.volumes().map { VolumeReport($0, node: node) }
                .filter { migrationStatus == nil || $0.migrationStatus == migrationStatus }
            if json { return try printJSON(reports.map(\.json)) }
            guard !reports.isEmpty else {
                if let migrationStatus { return print("no volume on this node has migration_status \(migrationStatus.rawValue)") }
                return print("no volumes on this node; create one with 'keel volume create NAME --size SIZE'")
            }
            let width = max(6, reports.map(\.record.name.count).max() ?? 0)
            let migrationWidth = max(9, reports.map(\.migrationSummary.count).max() ?? 0)
            print("NAME".padding(toLength: width, withPad: " ", startingAt: 0) + "  SIZE       REPLICAS  "
                + "MIGRATION".padding(toLength: migrationWidth, withPad: " ", startingAt: 0) + "  STATE")
            for report in reports {
                // One row per volume, counting its replicas as they were before a move that runs.
                let replicas = report.record.replicas.filter { !$0.isNew }.count
                print(report.record.name.padding(toLength: width, withPad: " ", startingAt: 0)
                    + "  " + humanSize(report.record.size).padding(toLength: 9, withPad: " ", startingAt: 0)
                    + "  " + "\(replicas)".padding(toLength: 8, withPad: " ", startingAt: 0)
                    + "  " + report.migrationSummary.padding(toLength: migrationWidth, withPad: " ", startingAt: 0)
                    + "  " + report.attachment.summary)
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show a volume: size, replicas, where it is attached, and its engine's view when running.")

        @OptionGroup var target: VolumeTarget

        func run() throws {
            let node = try Node(target.node)
            let report = VolumeReport(try node.volume(target.name), node: node)
            let engine = report.attachment.engineRunning && !report.record.enginePlacedElsewhere
                ? try? callEngine(node.engineControl(target.name), doing: "report its status") { try await $0.status(.init()) }
                : nil
            if target.json {
                var object = report.json
                if let engine {
                    object["engine"] = ["health": Status.health(engine), "epoch": engine.epoch,
                                        "replicas": engine.replicas.map { ["address": $0.address, "mode": $0.mode] }]
                }
                return try printJSON(object)
            }
            let record = report.record
            print("volume \(record.name): \(humanSize(record.size)) (\(record.size) bytes), \(report.attachment.summary)")
            if let link = report.attachment.link { print("  stable path: \(link)") }
            if record.enginePlacedElsewhere {
                print("  run by \(record.runner.rawValue), \(record.connections) kernel connection(s), engine on "
                    + record.engineNodes.joined(separator: " or ") + " at port \(record.enginePort)")
                if let frontend = report.attachment.frontend {
                    print("  frontend: \(frontend.state.rawValue) to \(frontend.engine)" + (frontend.failure.map { ", \($0)" } ?? ""))
                }
            } else {
                print("  run by \(record.runner.rawValue), \(record.connections) kernel connection(s), "
                    + "engine control \(node.engineControl(target.name))")
            }
            for (replica, running) in zip(record.replicas, report.replicasRunning) {
                let mode = engine?.replicas.first(where: { $0.address == replica.address })?.mode
                let where_ = replica.directory.map { "local, \($0)" } ?? replica.node.map { "on node \($0)" } ?? "remote"
                let state = running.map { $0 ? "running" : "stopped" }
                let role = replica.role == .member ? nil : "\(replica.role.rawValue) (move)"
                print("  replica \(replica.address)  (\([where_, state, mode, role].compactMap { $0 }.joined(separator: ", ")))")
            }
            if let engine { print("  engine: \(Status.health(engine)), epoch \(engine.epoch)") }
            if report.migration != nil { print("  migration: \(report.migrationSummary), see 'keel migrate status \(record.name)'") }
        }
    }
}
