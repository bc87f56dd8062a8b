/// Where a node keeps what `keel volume` manages, under its state directory:
///
/// ```
/// STATE/registry.sqlite           the node registry
/// STATE/replicas/VOLUME/rN/       data of the volume's local replicas
/// STATE/run/                      sockets and pid files
/// STATE/log/                      logs of the daemons keel runs itself
/// STATE/ca/                       the cluster CA (`keel ca init`), on the node that keeps it
/// STATE/tls/NAME/                 credentials `keel cert issue NAME` wrote
/// ```
public struct NodeLayout: Sendable {
    public static let defaultStateDirectory = "/var/lib/keel"

    public let stateDirectory: String

    public init(stateDirectory: String) {
        self.stateDirectory = stateDirectory.count > 1 && stateDirectory.hasSuffix("/")
            ? String(stateDirectory.dropLast()) : stateDirectory
    }

    public var registryPath: String { stateDirectory + "/registry.sqlite" }
    public var runDirectory: String { stateDirectory + "/run" }
    public var logDirectory: String { stateDirectory + "/log" }
    public var caDirectory: String { stateDirectory + "/ca" }
    public func credentialsDirectory(_ name: String) -> String { "\(stateDirectory)/tls/\(name)" }

    public func replicaDirectory(volume: String, index: Int) -> String {
        "\(stateDirectory)/replicas/\(volume)/r\(index)"
    }

    public func volumeDataDirectory(_ volume: String) -> String { "\(stateDirectory)/replicas/\(volume)" }

    /// A replica another host placed here through this node's agent: by the
    /// volume's identity, as volumes of different hosts may share a name.
    public func placedReplicaDirectory(volumeID: String, index: Int) -> String {
        "\(placedVolumeDirectory(volumeID: volumeID))/r\(index)"
    }

    public func placedVolumeDirectory(volumeID: String) -> String { "\(stateDirectory)/placed/\(volumeID)" }

    /// Its daemon name (`keel-replica@NAME`): the volume's name for people, its identity's first part to be unique.
    public func placedReplicaName(volume: String, volumeID: String, index: Int) -> String {
        "\(volume)-\(volumeID.prefix(8))-r\(index)"
    }

    /// The daemon name of a local replica: also its systemd instance (`keel-replica@NAME`).
    public func replicaName(volume: String, index: Int) -> String { "\(volume)-r\(index)" }

    public func replicaSocket(volume: String, index: Int) -> String {
        "\(runDirectory)/\(replicaName(volume: volume, index: index)).sock"
    }

    /// The engine's NBD listener, for user-space clients beside the kernel device.
    public func engineSocket(_ volume: String) -> String { "\(runDirectory)/\(volume).nbd" }
    public func engineControl(_ volume: String) -> String { "\(runDirectory)/\(volume).control" }
    /// A migration's new engine while it stands by (`token`: its own, six hex digits): its
    /// sockets take the engine's names when it takes over.
    public func standbyEngineSocket(_ volume: String, token: String) -> String { "\(runDirectory)/\(volume).next-\(token).nbd" }
    public func standbyEngineControl(_ volume: String, token: String) -> String { "\(runDirectory)/\(volume).next-\(token).control" }
    /// The device frontend's control API (`keel volume attach --mapper`): engine switches.
    public func frontendControl(_ volume: String) -> String { "\(runDirectory)/\(volume).frontend.control" }
    /// What the volume's device frontend last said of its engine (JSON).
    public func frontendStatus(_ volume: String) -> String { "\(runDirectory)/\(volume).frontend.json" }

    /// The longest socket path this layout makes for a volume name (unix socket paths hold 107 bytes).
    public func longestSocketPath(volume: String) -> Int {
        [(replicaSocket(volume: volume, index: 15) + ".control"), frontendControl(volume),
         standbyEngineControl(volume, token: "ffffff")].map(\.utf8.count).max()!
    }
}
