import ArgumentParser
import ControlAPI
import GRPCCore
import GRPCNIOTransportHTTP2
import Foundation
import Syscalls
import Volumes

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a volume's state: health, replicas (address, mode, epoch, rebuild), I/O counters.")

    @Option(help: "The engine's control address, HOST:PORT or unix:/path (its --control).")
    var engine: String

    @OptionGroup var control: ControlClientOptions

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    func run() throws {
        control.apply()
        let status = try callEngine(engine, doing: "report its status") { try await $0.status(.init()) }
        if json {
            print(try renderJSON(status))
        } else {
            print(render(status))
        }
    }

    static func health(_ status: Keel_Control_V1_EngineStatus) -> String {
        switch status.health {
        case .ok: return "healthy"
        case .degraded: return "degraded"
        case .faulted: return "faulted"
        case .UNRECOGNIZED(let value): return "unknown (\(value))"
        }
    }

    /// Every field, always (protobuf's JSON mapping would leave out zeroes).
    private func renderJSON(_ status: Keel_Control_V1_EngineStatus) throws -> String {
        let io = status.io
        let object: [String: Any] = [
            "volume": status.volume, "size": status.size, "epoch": status.epoch, "health": Self.health(status),
            "client_connections": status.clientConnections,
            "replicas": status.replicas.map {
                ["address": $0.address, "id": $0.id, "mode": $0.mode, "epoch": $0.epoch,
                 "rebuild_progress": $0.rebuildProgress, "rebuilt_bytes": $0.rebuiltBytes,
                 "error": $0.error] as [String: Any]
            },
            "io": ["reads": io.reads, "writes": io.writes, "read_bytes": io.readBytes,
                   "written_bytes": io.writtenBytes, "flushes": io.flushes, "errors": io.errors],
        ]
        let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    private func render(_ status: Keel_Control_V1_EngineStatus) -> String {
        var lines = ["volume \(status.volume): \(Self.health(status)), \(status.size) bytes, epoch \(status.epoch)"
            + ", \(status.clientConnections) client connection(s)"]
        let width = max(20, status.replicas.map(\.address.count).max() ?? 0)
        lines.append("  " + "REPLICA".padding(toLength: width, withPad: " ", startingAt: 0) + "  MODE  EPOCH  REBUILD  ERROR")
        for replica in status.replicas {
            let rebuild = replica.mode == "WO" ? "\(Int(replica.rebuildProgress * 100))%" : "-"
            lines.append("  " + replica.address.padding(toLength: width, withPad: " ", startingAt: 0)
                + "  " + replica.mode.padding(toLength: 4, withPad: " ", startingAt: 0)
                + "  " + "\(replica.epoch)".padding(toLength: 5, withPad: " ", startingAt: 0)
                + "  " + rebuild.padding(toLength: 7, withPad: " ", startingAt: 0)
                + "  " + replica.error)
        }
        let io = status.io
        lines.append("I/O: \(io.reads) reads (\(io.readBytes) bytes), \(io.writes) writes (\(io.writtenBytes) bytes), "
            + "\(io.flushes) flushes, \(io.errors) errors")
        return lines.joined(separator: "\n")
    }
}
