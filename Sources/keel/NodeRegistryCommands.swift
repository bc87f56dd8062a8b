import ArgumentParser
import ControlAPI
import Daemons
import Foundation
import NodeRegistry
import Syscalls
import Volumes

/// The nodes this one knows by name: where volumes may place their engines.
extension NodeCommand {
    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Know another node by name: its agent (keel node serve) must answer at ADDR.",
            discussion: """
                Volumes name it in --engine-node. This host is a node by itself, named by its hostname, \
                and needs no adding.
                Example: keel node add node-b 10.0.0.2:7800
                """)

        @Argument(help: "The node's name (letters, digits, '.', '_', '-').")
        var name: String

        @Argument(help: "Its agent's address, HOST:PORT.")
        var address: String

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var node: NodeOptions

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            if VolumeRecord.validate(name: name) != nil {
                throw ValidationError("a node name takes 1 to 64 letters, digits, '.', '_' or '-', and does not start with '.' or '-'")
            }
            guard name != thisNodeName else {
                throw ValidationError("\(name) is this host's name: this host is a node already")
            }
        }

        func run() throws {
            let parsed = try parseListenAddress(address, option: "ADDR")
            guard case .tcp = parsed else { throw KeelError("ADDR takes HOST:PORT, the agent's address on the network") }
            control.apply()
            let health = try callNode(address, doing: "report its health") { try await $0.health(.init(), options: .timeout(seconds: 5)) }
            let registry = try Node(node).registry
            let record = NodeRecord(name: name, address: "\(parsed)", addedAt: Int64(Date().timeIntervalSince1970))
            do { try registry.add(record) } catch { throw KeelError("\(error)") }
            if json { return try printJSON(["name": name, "address": record.address, "agent_name": health.name, "version": health.version]) }
            print("node \(name) at \(record.address): keel \(health.version)"
                + (health.name == name ? "" : " (it calls itself \(health.name))"))
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ls",
            abstract: "This host and the nodes it knows: reachable or not, and what runs there.")

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var node: NodeOptions

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            let this = try Node(node)
            var rows: [[String: Any]] = [[
                "name": thisNodeName, "address": "this host", "reachable": true,
                "daemons": this.runner(systemdIsRunning() ? .systemd : .keel).census().map {
                    ["kind": $0.kind.rawValue, "instance": $0.instance, "running": $0.running]
                },
            ]]
            for known in try this.registry.nodes() {
                control.apply()
                var row: [String: Any] = ["name": known.name, "address": known.address]
                do {
                    let health = try callNode(known.address, doing: "report its health") {
                        try await $0.health(.init(), options: .timeout(seconds: 3))
                    }
                    row["reachable"] = true
                    row["version"] = health.version
                    row["daemons"] = health.daemons.map { ["kind": $0.kind, "instance": $0.instance, "running": $0.running] }
                } catch {
                    row["reachable"] = false
                    row["error"] = "\(error)"
                }
                rows.append(row)
            }
            if json { return try printJSON(rows) }
            for row in rows {
                let name = row["name"] as? String ?? "", address = row["address"] as? String ?? ""
                guard row["reachable"] as? Bool == true else {
                    print("\(name)  \(address)  unreachable: \(row["error"] as? String ?? "")")
                    continue
                }
                let running = (row["daemons"] as? [[String: Any]] ?? []).filter { $0["running"] as? Bool == true }
                let summary = running.map { "\($0["kind"] as? String ?? "") \($0["instance"] as? String ?? "")" }
                print("\(name)  \(address)  reachable  " + (summary.isEmpty ? "nothing running" : summary.joined(separator: ", ")))
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Forget a node no volume places its engine or replicas on.")

        @Argument(help: "The node's name.")
        var name: String

        @OptionGroup var node: NodeOptions

        func run() throws {
            let registry = try Node(node).registry
            let known: Bool
            do { known = try registry.removeNode(named: name) } catch { throw KeelError("\(error)") }
            guard known else { throw KeelError("no node named \(name); see 'keel node ls'") }
            print("node \(name) forgotten")
        }
    }
}

/// This host's name as a node: its hostname.
