import ControlAPI
import Foundation
import NodeRegistry

/// A volume's engine on its engine nodes, through their agents.
public struct RemoteEngines {
    public let volume: VolumeRecord
    public let node: Node

    /// Calls to the agents take `credentials` (by default the node's own) over TCP.
    public init(volume: VolumeRecord, node: Node, credentials: ControlCredentials) {
        self.volume = volume
        self.node = node
        credentials.apply()
    }

    /// Each engine node and whether the volume's engine runs there (nil: its agent does not answer).
    public func states() -> [(node: String, running: Bool?)] {
        node.engineNodes(volume).map { engineNode in
            let health = try? callNode(engineNode.address, doing: "report its health") {
                try await $0.health(.init(), options: .timeout(seconds: 3))
            }
            return (engineNode.name, health.map { $0.daemons.contains { $0.kind == "engine" && $0.instance == volume.name && $0.running } })
        }
    }

    /// Stops the volume's engine wherever it runs; the nodes that could not be asked, with why.
    public func stop() -> [String] {
        node.engineNodes(volume).compactMap { engineNode in
            do {
                _ = try callNode(engineNode.address, doing: "stop the engine of \(volume.name)") {
                    try await $0.stopEngine(.with { $0.volume = volume.name }, options: .timeout(seconds: 150))
                }
                return nil
            } catch {
                return "\(engineNode.name): \(error)"
            }
        }
    }
}
