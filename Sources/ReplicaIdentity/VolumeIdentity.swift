/// The volume a replica belongs to: its name, and its identity where it has
/// one (`keel volume create` mints it; names are reused, identities never).
/// A replica records it at its first claim.
public struct VolumeIdentity: Equatable, Sendable, CustomStringConvertible {
    public var name: String
    public var id: String

    public init(name: String, id: String = "") {
        self.name = name
        self.id = id
    }

    public var description: String { id.isEmpty ? "volume \(name)" : "volume \(name) (\(id))" }

    /// Why a replica of this volume must refuse an engine of `other`, or nil.
    /// A recorded identity decides, and an engine without one is refused (a
    /// reused name must not pass for the volume); otherwise the names must
    /// match (an unrecorded name matches anything).
    public func refusal(of other: VolumeIdentity) -> String? {
        if !id.isEmpty {
            if other.id.isEmpty {
                return "this replica belongs to \(self); give the engine --volume-id \(id); nothing was changed"
            }
            return id == other.id ? nil : "this replica belongs to \(self), not to \(other); nothing was changed"
        }
        guard !name.isEmpty, !other.name.isEmpty, name != other.name else { return nil }
        return "this replica belongs to \(self), not to \(other); nothing was changed"
    }

    /// Why a replica of this volume must refuse a snapshot reader that asks for volume `name`, or nil.
    /// A reader claims nothing and writes nothing: its name must match, it needs no identity.
    public func refusal(ofReaderOf name: String) -> String? {
        guard !self.name.isEmpty, self.name != name else { return nil }
        return "this replica belongs to \(self), not to volume \(name)"
    }

    /// What a claim by `other` leaves recorded: the first name and identity stay.
    public func recording(_ other: VolumeIdentity) -> VolumeIdentity {
        VolumeIdentity(name: name.isEmpty ? other.name : name, id: id.isEmpty ? other.id : id)
    }
}
