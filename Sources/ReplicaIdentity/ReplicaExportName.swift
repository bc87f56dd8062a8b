/// The export an engine opens on a replica, which carries its claim:
/// `<volume>@<epoch>+<engine>/<volume-id>` (the engine and the volume
/// identity may be left out, as a probe that claims nothing does).
/// Opening it with a newer epoch claims the replica for that engine. A
/// replica lists one export, named after its current owner and volume, so
/// that an engine can look before it claims.
///
/// `<volume>@standby:<epoch>+<engine>/<volume-id>` opens a standby session:
/// it claims nothing and fences nobody; its requests wait until the engine
/// claims that epoch (the replica control API's `Claim`). A migration's new
/// engine holds such sessions, so that taking over costs one claim per replica.
public struct ReplicaExportName: Equatable, Sendable, CustomStringConvertible {
    static let standbyMarker = "standby:"

    public var volume: VolumeIdentity
    public var owner: Owner
    public var standby: Bool

    public init(volume: VolumeIdentity, owner: Owner, standby: Bool = false) {
        self.volume = volume
        self.owner = owner
        self.standby = standby
    }

    public var description: String {
        var name = "\(volume.name)@\(standby ? Self.standbyMarker : "")\(owner.epoch)"
        if !owner.engine.isEmpty || !volume.id.isEmpty { name += "+\(owner.engine)" }
        if !volume.id.isEmpty { name += "/\(volume.id)" }
        return name
    }

    /// Nil for anything that is not such a name, or whose epoch a replica cannot store.
    public init?(parsing name: String) {
        guard let at = name.lastIndex(of: "@") else { return nil }
        var rest = name[name.index(after: at)...]
        let standby = rest.hasPrefix(Self.standbyMarker)
        if standby { rest = rest.dropFirst(Self.standbyMarker.count) }
        var volumeID = ""
        if let slash = rest.firstIndex(of: "/") {
            volumeID = String(rest[rest.index(after: slash)...])
            rest = rest[..<slash]
        }
        let parts = rest.split(separator: "+", maxSplits: 1, omittingEmptySubsequences: false)
        guard let epoch = UInt64(parts[0]), epoch <= Owner.maximumEpoch,
              volumeID.allSatisfy({ $0.isASCII && ($0.isHexDigit || $0 == "-") }) else { return nil }
        self.init(volume: VolumeIdentity(name: String(name[..<at]), id: volumeID),
                  owner: Owner(epoch: epoch, engine: parts.count > 1 ? String(parts[1]) : ""), standby: standby)
    }
}
