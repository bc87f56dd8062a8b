/// What a server tells clients about one export.
public struct ExportDescription: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var readOnly: Bool
    public var blockSizes: BlockSizes
    /// Opaque to the protocol; handed to the device with every request of
    /// connections on this export (a replica puts the engine's epoch here).
    public var session: UInt64
    /// Metadata contexts offered besides `base:allocation` (which every export has).
    public var metaContexts: [MetaContextOffer]

    public init(name: String, description: String = "", size: UInt64, readOnly: Bool,
                blockSizes: BlockSizes = BlockSizes(), session: UInt64 = 0, metaContexts: [MetaContextOffer] = []) {
        self.name = name
        self.description = description
        self.size = size
        self.readOnly = readOnly
        self.blockSizes = blockSizes
        self.session = session
        self.metaContexts = metaContexts
    }

    /// Transmission flags for this export; DF only makes sense with structured replies.
    public func transmissionFlags(structuredReplies: Bool) -> TransmissionFlags {
        var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
        if readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}

/// NBD_INFO_BLOCK_SIZE. Keel accepts any byte offset and length (minimum 1);
/// `preferred` is what avoids read-modify-write on the server.
public struct BlockSizes: Sendable, Equatable {
    public var minimum: UInt32
    public var preferred: UInt32
    public var maximum: UInt32

    /// The protocol asks servers not to treat payloads below 2^25 as abuse.
    public static let maximumPayload: UInt32 = 32 << 20

    public init(minimum: UInt32 = 1, preferred: UInt32 = 4096, maximum: UInt32 = BlockSizes.maximumPayload) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
    }
}

/// A metadata context an export offers besides `base:allocation`: its name
/// and the id its BLOCK_STATUS chunks carry (chosen by the device, never
/// `MetaContext.baseAllocationID` or 0).
public struct MetaContextOffer: Sendable, Equatable {
    public var name: String
    public var id: UInt32

    public init(name: String, id: UInt32) {
        precondition(id != 0 && id != MetaContext.baseAllocationID, "context id \(id) is reserved")
        self.name = name
        self.id = id
    }
}

/// The outcome of a successful handshake: everything transmission needs.
public struct Negotiated: Sendable, Equatable {
    public var export: ExportDescription
    public var structuredReplies: Bool
    /// `base:allocation` was selected for this export.
    public var baseAllocation: Bool
    /// The one other context selected, if any (a server may select fewer than asked).
    public var extraContext: MetaContextOffer?

    public init(export: ExportDescription, structuredReplies: Bool, baseAllocation: Bool,
                extraContext: MetaContextOffer? = nil) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.baseAllocation = baseAllocation
        self.extraContext = extraContext
    }

    /// Some context was selected, so BLOCK_STATUS is allowed.
    public var answersBlockStatus: Bool { baseAllocation || extraContext != nil }

    public var transmissionFlags: TransmissionFlags {
        export.transmissionFlags(structuredReplies: structuredReplies)
    }
}

/// Where the handshake finds exports by name.
public protocol ExportCatalog: Sendable {
    /// What NBD_OPT_LIST shows.
    var listed: [ExportDescription] { get }
    /// The export a client asks for ("" is the default export). `opening` is
    /// true for GO and EXPORT_NAME, which start transmission; INFO and meta
    /// context queries only look.
    func resolve(_ name: String, opening: Bool) -> ExportResolution
    /// A connection entered the transmission phase on `export` (after the handshake).
    func transmissionStarted(_ export: ExportDescription)
    /// That connection closed.
    func transmissionEnded(_ export: ExportDescription)
}

extension ExportCatalog {
    public func transmissionStarted(_ export: ExportDescription) {}
    public func transmissionEnded(_ export: ExportDescription) {}
}

public enum ExportResolution: Equatable, Sendable {
    case found(ExportDescription)
    /// Refused with this option error and message.
    case refused(OptionReplyType, String)
}

/// A fixed list of exports; the first is also the default export.
public struct StaticExports: ExportCatalog {
    public let listed: [ExportDescription]

    public init(_ exports: [ExportDescription]) {
        precondition(!exports.isEmpty)
        listed = exports
    }

    public func resolve(_ name: String, opening: Bool) -> ExportResolution {
        if name.isEmpty { return .found(listed[0]) }
        if let export = listed.first(where: { $0.name == name }) { return .found(export) }
        return .refused(.errUnknown, "no export named '\(name)'")
    }
}
