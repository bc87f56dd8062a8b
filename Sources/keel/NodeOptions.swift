import ArgumentParser
import Foundation
import NodeRegistry
import Volumes

/// `--state-dir`, shared by every `keel volume` command.
struct NodeOptions: ParsableArguments {
    @Option(help: "The node's state directory: registry, local replicas, sockets, logs (default: $KEEL_STATE_DIR, else /var/lib/keel).")
    var stateDir: String?

    var layout: NodeLayout {
        NodeLayout(stateDirectory: stateDir ?? ProcessInfo.processInfo.environment["KEEL_STATE_DIR"]
            ?? NodeLayout.defaultStateDirectory)
    }
}

/// What every `keel volume` command on one volume takes.
struct VolumeTarget: ParsableArguments {
    @Argument(help: "The volume's name.")
    var name: String

    @Flag(help: "Print JSON.")
    var json = false

    @OptionGroup var node: NodeOptions
}

extension Node {
    init(_ options: NodeOptions) throws { try self.init(layout: options.layout) }
}
