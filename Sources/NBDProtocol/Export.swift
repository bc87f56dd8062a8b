/// What a server tells clients about one export.
public struct ExportDescription: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var readOnly: Bool
    public var blockSizes: BlockSizes

    public init(name: String, description: String = "", size: UInt64, readOnly: Bool,
                blockSizes: BlockSizes = BlockSizes()) {
        self.name = name
        self.description = description
        self.size = size
        self.readOnly = readOnly
        self.blockSizes = blockSizes
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

/// The outcome of a successful handshake: everything transmission needs.
public struct Negotiated: Sendable, Equatable {
    public var export: ExportDescription
    public var structuredReplies: Bool
    /// `base:allocation` was selected for this export, so BLOCK_STATUS is allowed.
    public var baseAllocation: Bool

    public init(export: ExportDescription, structuredReplies: Bool, baseAllocation: Bool) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.baseAllocation = baseAllocation
    }

    public var transmissionFlags: TransmissionFlags {
        export.transmissionFlags(structuredReplies: structuredReplies)
    }
}
