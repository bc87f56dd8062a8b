import Foundation
import NodeRegistry
import Syscalls

/// What `keel volume move` is asked: the volume's new full set of replicas.
public struct ReplicaMoveRequest: Sendable {
    public var volume: String
    /// Nodes (`keel node add` names) to hold one replica each; one that holds a replica of the volume keeps it.
    public var nodes: [String]
    /// Replicas by data address: one of the volume's keeps its place; another must serve already (`keel replica serve`).
    public var addresses: [String]

    public init(volume: String, nodes: [String] = [], addresses: [String] = []) {
        self.volume = volume
        self.nodes = nodes
        self.addresses = addresses
    }
}

/// The request against the volume's replicas: which stay, which join, which leave.
struct ReplicaMovePlan {
    var keep: [ReplicaRecord]
    var joinNodes: [NodeRecord]
    var joinAddresses: [Syscalls.SocketAddress]
    var leave: [ReplicaRecord]

    /// For people: "nodes d, e; 127.0.0.1:7005".
    var target: String {
        var parts: [String] = []
        let nodes = keep.compactMap(\.node) + joinNodes.map(\.name)
        if !nodes.isEmpty { parts.append("node" + (nodes.count == 1 ? " " : "s ") + nodes.joined(separator: ", ")) }
        let addresses = keep.filter { $0.node == nil }.map(\.address) + joinAddresses.map { "\($0)" }
        if !addresses.isEmpty { parts.append(addresses.joined(separator: ", ")) }
        return parts.joined(separator: "; ")
    }

    /// Checks the request against the volume and this node's registry; every refusal is one line saying what to do.
    init(_ request: ReplicaMoveRequest, volume: VolumeRecord, node: Node) throws {
        guard !request.nodes.isEmpty || !request.addresses.isEmpty else {
            throw KeelError("name the volume's new replicas with --replica-node NODE or --replica HOST:PORT (each repeated)")
        }
        guard Set(request.nodes).count == request.nodes.count else {
            throw KeelError("--replica-node names each node once: a node holds one replica of a volume")
        }
        guard request.nodes.count + request.addresses.count <= 16 else { throw KeelError("a volume has 1 to 16 replicas") }
        guard !volume.enginePlacedElsewhere else {
            throw KeelError("volume \(volume.name) runs its engine on engine nodes (\(volume.engineNodes.joined(separator: ", "))); "
                + "moving its replicas needs its engine on this host")
        }
        if let busy = volume.replicas.first(where: { $0.role != .member }) {
            throw KeelError("replica \(busy.address) of \(volume.name) is still \(busy.role.rawValue) from an unfinished move; "
                + "run 'keel volume move \(volume.name) --cancel' first")
        }
        var keep: [ReplicaRecord] = [], joinNodes: [NodeRecord] = [], joinAddresses: [Syscalls.SocketAddress] = []
        for name in request.nodes {
            if let held = volume.replicas.first(where: { $0.node == name }) {
                keep.append(held)
            } else if let known = try node.registry.node(named: name) {
                joinNodes.append(known)
            } else if name == thisNodeName {
                throw KeelError("--replica-node \(name) is this host: name its replicas here by address (--replica unix:/path, as 'keel volume show' lists them)")
            } else {
                throw KeelError("no node named \(name) for --replica-node; add it with 'keel node add \(name) HOST:PORT' (see 'keel node ls')")
            }
        }
        for text in request.addresses {
            let address = try parseListenAddress(text, option: "--replica")
            if let held = volume.replicas.first(where: { Self.sameAddress($0.address, address) }) {
                guard !keep.contains(held) else { throw KeelError("--replica \(text) is named twice") }
                keep.append(held)
            } else {
                guard !joinAddresses.contains(address) else { throw KeelError("--replica \(text) is named twice") }
                try node.checkServedReplica(address, size: volume.size)
                joinAddresses.append(address)
            }
        }
        let leave = volume.replicas.filter { !keep.contains($0) }
        guard !joinNodes.isEmpty || !joinAddresses.isEmpty || !leave.isEmpty else {
            throw KeelError("volume \(volume.name) has these replicas already; nothing to move")
        }
        self.keep = keep
        self.joinNodes = joinNodes
        self.joinAddresses = joinAddresses
        self.leave = leave
    }

    static func sameAddress(_ recorded: String, _ address: Syscalls.SocketAddress) -> Bool {
        (try? Syscalls.SocketAddress(parsing: recorded)).map { "\($0)" == "\(address)" } ?? false
    }
}
