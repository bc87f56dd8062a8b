import CZstd
import Crypto
import Foundation

/// A block's name in the store: the SHA-256 of its uncompressed bytes, in lowercase hex.
public struct BlockHash: Hashable, Comparable, Codable, CustomStringConvertible, Sendable {
    public let hex: String

    public init(of bytes: UnsafeRawBufferPointer) {
        hex = SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
    }

    public init?(hex: String) {
        guard hex.count == 64, hex.allSatisfy({ $0.isHexDigit && !$0.isUppercase }) else { return nil }
        self.hex = hex
    }

    public init(from decoder: Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let hash = BlockHash(hex: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a SHA-256: \(text)"))
        }
        self = hash
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(hex)
    }

    public var description: String { hex }
    public static func < (a: BlockHash, b: BlockHash) -> Bool { a.hex < b.hex }
}

public struct BlockCodecError: Error, CustomStringConvertible {
    public let description: String
}

/// zstd over whole blocks (libzstd's one-shot API: a block is small enough to hold twice).
public enum BlockCodec {
    /// Level 3 is zstd's default: ~300 MB/s per core here, a fair ratio; higher levels cost the backup's CPU.
    static let level: Int32 = 3
    /// Three samples of this size (the block's start, middle and end) decide whether it is worth compressing.
    static let incompressibleSample = 32 << 10
    /// A block moves over NBD as pieces of 256 KiB (what nbdcopy sends) all in flight at once:
    /// the server works on them in parallel.
    static let transferPiece = 256 << 10

    public static func compress(_ bytes: UnsafeRawBufferPointer) throws -> [UInt8] {
        let bound = compressBound(bytes.count)
        var failure: Error?
        let output = [UInt8](unsafeUninitializedCapacity: bound) { out, count in
            do { count = try Compressor().compress(bytes, into: UnsafeMutableRawBufferPointer(out)) } catch {
                failure = error
                count = 0
            }
        }
        if let failure { throw failure }
        return output
    }

    public static func compressBound(_ count: Int) -> Int { ZSTD_compressBound(count) }

    /// zstd's largest block (RFC 8878, Block_Maximum_Size).
    static let maxBlock = 128 << 10

    /// A zstd frame of raw (stored) blocks: magic, a single-segment header with the 4-byte content size,
    /// then each block's 3-byte header (last flag, type 0, size) and its bytes (RFC 8878, 3.1.1). What
    /// zstd itself writes for data it cannot shrink, without its search.
    static func rawFrame(_ bytes: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int {
        precondition(bytes.count < 1 << 32, "a raw frame records its size in 4 bytes")
        var position = 0
        func put(_ value: UInt32, bytes count: Int) {
            for i in 0 ..< count { output[position + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
            position += count
        }
        put(0xFD2F_B528, bytes: 4)
        put(0b1010_0000, bytes: 1)  // Frame_Content_Size_flag 2 (4 bytes), Single_Segment_flag
        put(UInt32(bytes.count), bytes: 4)
        var start = 0
        repeat {
            let count = min(maxBlock, bytes.count - start)
            let last: UInt32 = start + count == bytes.count ? 1 : 0
            put(UInt32(count) << 3 | last, bytes: 3)  // Block_Type 0: raw
            UnsafeMutableRawBufferPointer(rebasing: output[position ..< position + count])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[start ..< start + count]))
            position += count
            start += count
        } while start < bytes.count
        return position
    }

    /// A zstd context kept for many blocks: each new one allocates and clears its tables.
    public final class Compressor {
        private let context: OpaquePointer

        public init() {
            guard let context = ZSTD_createCCtx() else { fatalError("zstd: no memory for a compression context") }
            self.context = context
        }

        deinit { ZSTD_freeCCtx(context) }

        /// Compresses into `output` (at least `compressBound(bytes.count)` bytes) and returns the compressed length.
        /// At level 3 zstd spends 0.3 CPU-s per GiB finding nothing in incompressible data (random, encrypted,
        /// already compressed). As ZFS's zstd early abort does, cheap tries on samples decide: a block none of
        /// whose three samples shrinks at level 1 is stored in a frame of raw blocks (any decoder reads it).
        public func compress(_ bytes: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws -> Int {
            precondition(output.count >= compressBound(bytes.count), "zstd needs room for its worst case")
            if try isIncompressible(bytes, scratch: output) { return BlockCodec.rawFrame(bytes, into: output) }
            return try compress(bytes, into: output, level: level)
        }

        private func isIncompressible(_ bytes: UnsafeRawBufferPointer, scratch: UnsafeMutableRawBufferPointer) throws -> Bool {
            let sample = BlockCodec.incompressibleSample
            guard bytes.count >= 8 * sample else { return false }
            for start in [0, bytes.count / 2 - sample / 2, bytes.count - sample] {
                let piece = UnsafeRawBufferPointer(rebasing: bytes[start ..< start + sample])
                if try compress(piece, into: scratch, level: 1) < sample - sample / 64 { return false }
            }
            return true
        }

        private func compress(_ bytes: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, level: Int32) throws -> Int {
            let result = ZSTD_compressCCtx(context, output.baseAddress, output.count, bytes.baseAddress, bytes.count, level)
            guard ZSTD_isError(result) == 0 else { throw BlockCodecError(description: "zstd: " + String(cString: ZSTD_getErrorName(result))) }
            return result
        }
    }

    /// Decompresses a block that must be exactly `size` bytes.
    public static func decompress(_ bytes: [UInt8], size: Int) throws -> [UInt8] {
        var failure: Error?
        let output = [UInt8](unsafeUninitializedCapacity: size) { out, count in
            do {
                try decompress(bytes, into: UnsafeMutableRawBufferPointer(out))
                count = size
            } catch {
                failure = error
                count = 0
            }
        }
        if let failure { throw failure }
        return output
    }

    /// Decompresses a block that must fill `buffer` exactly.
    public static func decompress(_ bytes: [UInt8], into buffer: UnsafeMutableRawBufferPointer) throws {
        let result = bytes.withUnsafeBytes { ZSTD_decompress(buffer.baseAddress, buffer.count, $0.baseAddress, bytes.count) }
        guard ZSTD_isError(result) == 0 else {
            throw BlockCodecError(description: "zstd: " + String(cString: ZSTD_getErrorName(result)))
        }
        guard result == buffer.count else { throw BlockCodecError(description: "block decompressed to \(result) bytes, not \(buffer.count)") }
    }

    public static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var words = bytes.count / 8
        var pointer = bytes.baseAddress!
        while words > 0 {
            if pointer.loadUnaligned(as: UInt64.self) != 0 { return false }
            pointer += 8
            words -= 1
        }
        return bytes[(bytes.count / 8 * 8)...].allSatisfy { $0 == 0 }
    }
}

extension BlockCodec {
    /// Decompresses one zstd frame that records its content size (all Keel writes do), up to `limit` bytes.
    public static func decompressFrame(_ bytes: [UInt8], limit: Int = 1 << 30) throws -> [UInt8] {
        let size = bytes.withUnsafeBytes { ZSTD_getFrameContentSize($0.baseAddress, bytes.count) }
        guard size != ZSTD_CONTENTSIZE_ERROR, size != ZSTD_CONTENTSIZE_UNKNOWN, size <= UInt64(limit) else {
            throw BlockCodecError(description: "not a zstd frame with its size recorded")
        }
        return try decompress(bytes, size: Int(size))
    }
}
