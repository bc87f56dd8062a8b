import ControlAPI
import Foundation
import NodeRegistry
import Syscalls

/// A volume's replicas on other nodes (`--replica-node`), through those nodes' agents.
/// Each is known there by the volume's identity and its index in the volume.
public struct RemoteReplicas {
    public let volume: VolumeRecord
    public let node: Node

    /// Calls to the agents take `credentials` (by default the node's own) over TCP.
    public init(volume: VolumeRecord, node: Node, credentials: ControlCredentials) {
        self.volume = volume
        self.node = node
        credentials.apply()
    }

    /// The replicas an agent placed, with their slot and their node.
    public var placed: [(index: Int, replica: ReplicaRecord, agent: NodeRecord)] {
        volume.replicas.compactMap { replica in
            guard let name = replica.node, let agent = try? node.registry.node(named: name) else { return nil }
            return (replica.slot, replica, agent)
        }
    }

    /// Has `agent` start the volume's replica in `slot` on a port it picks; returns its record.
    public func place(slot: Int, on agent: NodeRecord, role: ReplicaRecord.Role = .member) throws -> ReplicaRecord {
        let started = try start(index: slot, port: 0, on: agent)
        return ReplicaRecord(address: started, node: agent.name, slot: slot, role: role)
    }

    /// Starts every placed replica that is not running, at its recorded address (after its node restarted, say).
    public func start() throws {
        for (index, replica, agent) in placed {
            guard case .tcp(_, let port)? = try? Syscalls.SocketAddress(parsing: replica.address) else {
                throw KeelError("replica \(index) of \(volume.name) on node \(agent.name) has no TCP address (\(replica.address))")
            }
            _ = try start(index: index, port: port, on: agent)
        }
    }

    /// Stops every placed replica (or those `only` selects) and deletes its data; the ones that could not be, with why.
    public func remove(only selected: (ReplicaRecord) -> Bool = { _ in true }) -> [String] {
        placed.filter { selected($0.replica) }.compactMap { index, replica, agent in
            do {
                _ = try callNode(agent.address, doing: "remove replica \(index) of \(volume.name)") {
                    try await $0.stopReplica(.with {
                        $0.volume = volume.name
                        $0.volumeID = volume.id
                        $0.index = UInt32(index)
                        $0.removeData = true
                    }, options: .timeout(seconds: 60))
                }
                return nil
            } catch {
                return "\(replica.address) on node \(agent.name): \(error)"
            }
        }
    }

    private func start(index: Int, port: UInt16, on agent: NodeRecord) throws -> String {
        try callNode(agent.address, doing: "start replica \(index) of \(volume.name)") {
            try await $0.startReplica(.with {
                $0.volume = volume.name
                $0.volumeID = volume.id
                $0.index = UInt32(index)
                $0.size = volume.size
                $0.port = UInt32(port)
            }, options: .timeout(seconds: 60))
        }.address
    }
}
