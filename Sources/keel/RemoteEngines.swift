import ControlAPI
import Foundation
import NodeRegistry

/// A volume's engine on its engine nodes, through their agents.
struct RemoteEngines {
    let volume: VolumeRecord
    let node: Node

    /// Each engine node and whether the volume's engine runs there (nil: its agent does not answer).
    func states() -> [(node: String, running: Bool?)] {
        zip(volume.engineNodes, node.engineNodeAddresses(volume)).map { name, address in
            let health = try? callNode(address, doing: "report its health") {
                try await $0.health(.init(), options: .timeout(seconds: 3))
            }
            return (name, health.map { $0.daemons.contains { $0.kind == "engine" && $0.instance == volume.name && $0.running } })
        }
    }

    /// Stops the volume's engine wherever it runs; the nodes that could not be asked, with why.
    func stop() -> [String] {
        zip(volume.engineNodes, node.engineNodeAddresses(volume)).compactMap { name, address in
            do {
                _ = try callNode(address, doing: "stop the engine of \(volume.name)") {
                    try await $0.stopEngine(.with { $0.volume = volume.name }, options: .timeout(seconds: 150))
                }
                return nil
            } catch {
                return "\(name): \((error as? CLIError)?.message ?? "\(error)")"
            }
        }
    }
}
