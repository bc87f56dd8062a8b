@testable import BackupStore
import Foundation
import Testing

/// The backup store against a real directory and real NBD exports (nbdkit's file plugin).
@Suite struct BackupStoreTests {
    static let blockSize = StoreConfig.defaultBlockSize

    @Test func zstdRoundTripsABlockAndZeroIsSeen() throws {
        var bytes = [UInt8](repeating: 0, count: Self.blockSize)
        #expect(bytes.withUnsafeBytes { BlockCodec.isAllZero($0) })
        bytes[Self.blockSize - 1] = 1
        #expect(!bytes.withUnsafeBytes { BlockCodec.isAllZero($0) })
        var random = Fixture.Random(seed: 1)
        for i in stride(from: 0, to: bytes.count, by: 3) { bytes[i] = UInt8(truncatingIfNeeded: random.next()) }
        let compressed = try bytes.withUnsafeBytes { try BlockCodec.compress($0) }
        #expect(try BlockCodec.decompress(compressed, size: bytes.count) == bytes)
        #expect(throws: (any Error).self) { try BlockCodec.decompress(compressed, size: bytes.count - 1) }
    }

    /// A block none of whose samples (start, middle, end) compresses is stored as a frame of raw blocks:
    /// zstd reads it back, with its size recorded. One that compresses anywhere sampled gets level 3,
    /// noise at its start or not.
    @Test func incompressibleBlocksAreStoredRawAndStillRoundTrip() throws {
        var random = Fixture.Random(seed: 3)
        let noise = (0 ..< Self.blockSize).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        let compressor = BlockCodec.Compressor()
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: BlockCodec.compressBound(Self.blockSize), alignment: 4096)
        defer { output.deallocate() }
        func roundTrip(_ bytes: [UInt8]) throws -> Int {
            let count = try bytes.withUnsafeBytes { try compressor.compress($0, into: output) }
            let frame = Array(output[0 ..< count])
            #expect(try BlockCodec.decompress(frame, size: bytes.count) == bytes)
            #expect(try BlockCodec.decompressFrame(frame) == bytes, "the content size is recorded")
            return count
        }
        let blocks = (Self.blockSize + (128 << 10) - 1) / (128 << 10)
        #expect(try roundTrip(noise) == 9 + 3 * blocks + Self.blockSize, "a raw frame: header, block headers, the bytes")
        let noisyStart = Array(noise[0 ..< 256 << 10]) + [UInt8](repeating: 0, count: Self.blockSize - (256 << 10))
        #expect(try roundTrip(noisyStart) < 300 << 10)
        let noisyEnd = [UInt8](repeating: 7, count: Self.blockSize - (256 << 10)) + Array(noise[0 ..< 256 << 10])
        #expect(try roundTrip(noisyEnd) < 300 << 10)
        let text = (0 ..< Self.blockSize).map { UInt8(ascii: "a") + UInt8($0 % 7) }
        #expect(try roundTrip(text) < 4 << 10)
    }

    /// Raw frames of every shape zstd must read: empty, one byte, a block's exact size, one past it.
    @Test(arguments: [0, 1, 128 << 10, (128 << 10) + 1, 300_001])
    func rawFramesDecodeWithZstd(size: Int) throws {
        var random = Fixture.Random(seed: UInt64(size) + 11)
        let bytes = (0 ..< size).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: BlockCodec.compressBound(max(size, 1)), alignment: 16)
        defer { output.deallocate() }
        let count = bytes.withUnsafeBytes { BlockCodec.rawFrame($0, into: output) }
        #expect(try BlockCodec.decompressFrame(Array(output[0 ..< count])) == bytes)
    }

    /// Deferred puts: invisible until made durable, then whole; through O_DIRECT on a disk file
    /// system, through the page cache on tmpfs (which refuses O_DIRECT). Sizes not a multiple of 4 KiB.
    @Test(arguments: [FileManager.default.temporaryDirectory.path, "/dev/shm"])
    func deferredPutsAppearWholeOnceDurable(under parent: String) throws {
        guard FileManager.default.fileExists(atPath: parent) else { return }
        let root = parent + "/keel-deferred-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        let target = try openBackupTarget("file://" + root)
        var random = Fixture.Random(seed: 7)
        let objects = (0 ..< 70).map { index in
            ("blocks/\(String(format: "%02x", index))/object", (0 ..< (1000 + index * 4099)).map { _ in UInt8(truncatingIfNeeded: random.next()) })
        }
        for (key, bytes) in objects.prefix(3) { try target.putDeferred(key, bytes) }
        #expect(try !target.exists(objects[0].0), "not visible before it is durable")
        for (key, bytes) in objects.dropFirst(3) { try target.putDeferred(key, bytes) }  // past a batch of 64
        try target.makeDurable()
        for (key, bytes) in objects { #expect(try target.get(key) == bytes, "\(key)") }
        #expect(try target.list("blocks/").count == objects.count, "no temporary file is listed")
        let left = (FileManager.default.enumerator(atPath: root)?.allObjects as? [String] ?? []).filter { $0.contains(".tmp-") }
        #expect(left.isEmpty, "no temporary file is left (tmpfs makes the file before it refuses O_DIRECT): \(left)")
    }

    @Test func sha256NamesMatchThePublishedVector() {
        let abc = Array("abc".utf8)
        #expect(abc.withUnsafeBytes { BlockHash(of: $0) }.hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test(arguments: TargetKind.allCases) func aFullBackupRestoresByteForByteToAFileAndToAnExport(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        // 9 blocks and 4 KiB: a short last block; blocks 2 and 5 all zero.
        let volume = fixture.randomVolume(size: 9 * Self.blockSize + 4096, seed: 2, zeroBlocks: [2, 5])
        let summary = try fixture.backUp(volume, name: "db")
        #expect(summary.blocks == 8)
        #expect(summary.newBlocks == 8)
        #expect(!summary.incremental)
        #expect(try fixture.store.backups().map(\.id) == [summary.id])

        let file = fixture.path("restored.img")
        try BackupRestorer(store: fixture.store, id: summary.id).run(to: .file(file))
        #expect(try fixture.read(file) == volume)

        let exportFile = fixture.image(size: volume.count, fill: 0xAB)  // old data, zeroed where the volume was zero
        let export = try fixture.serve(exportFile, writable: true)
        try BackupRestorer(store: fixture.store, id: summary.id).run(to: .nbd(export.uri))
        export.stop()
        #expect(try fixture.read(exportFile) == volume)
    }

    @Test(arguments: TargetKind.allCases) func anIncrementalBackupReadsOnlyTheChangedBlocksAndRestoresTheNewData(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        var volume = fixture.randomVolume(size: 16 * Self.blockSize, seed: 3, zeroBlocks: [])
        let full = try fixture.backUp(volume, name: "db")
        for index in [1, 7] { fixture.scramble(&volume, block: index, seed: UInt64(index)) }
        let parent = BackupParent(summary: full, map: try fixture.store.map(full.id), changed: [1, 7])
        let incremental = try fixture.backUp(volume, name: "db", parent: parent)
        #expect(incremental.incremental)
        #expect(incremental.parent == full.id)
        #expect(incremental.bytesRead == UInt64(2 * Self.blockSize))
        #expect(incremental.newBlocks == 2)
        let file = fixture.path("restored.img")
        try BackupRestorer(store: fixture.store, id: incremental.id).run(to: .file(file))
        #expect(try fixture.read(file) == volume)
    }

    @Test(arguments: TargetKind.allCases) func twoVolumesWithTheSameDataShareTheirBlocks(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        let volume = fixture.randomVolume(size: 4 * Self.blockSize, seed: 4, zeroBlocks: [])
        let first = try fixture.backUp(volume, name: "a")
        let second = try fixture.backUp(volume, name: "b")
        #expect(first.newBlocks == 4)
        #expect(second.newBlocks == 0)
        #expect(second.bytesSent == 0)
        #expect(try fixture.store.target.list(StoreKey.blocks).count == 4)
        #expect(try fixture.store.backups(of: "b").map(\.id) == [second.id])
    }

    @Test(arguments: TargetKind.allCases) func removingAMiddleBackupKeepsTheNewestWholeAndGCFreesExactlyTheUnnamedBlocks(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        var volume = fixture.randomVolume(size: 6 * Self.blockSize, seed: 5, zeroBlocks: [])
        let oldest = try fixture.backUp(volume, name: "db")
        fixture.scramble(&volume, block: 0, seed: 50)
        let middle = try fixture.backUp(volume, name: "db")
        fixture.scramble(&volume, block: 0, seed: 51)
        let newest = try fixture.backUp(volume, name: "db")
        let middleOnly = Set(try fixture.store.map(middle.id).blocks.map(\.hash))
            .subtracting(try fixture.store.map(oldest.id).blocks.map(\.hash))
            .subtracting(try fixture.store.map(newest.id).blocks.map(\.hash))
        #expect(middleOnly.count == 1)

        try fixture.store.remove(middle.id)
        #expect(try fixture.store.backups().map(\.id) == [oldest.id, newest.id])
        let report = try fixture.store.collectGarbage(holder: "test")
        #expect(report.blocksFreed == 1)
        #expect(try !fixture.store.target.exists(StoreKey.block(middleOnly.first!)))
        #expect(try fixture.store.verify().isClean)
        let file = fixture.path("restored.img")
        try BackupRestorer(store: fixture.store, id: newest.id).run(to: .file(file))
        #expect(try fixture.read(file) == volume)
        #expect(try fixture.store.collectGarbage(holder: "test").blocksFreed == 0)
    }

    @Test(arguments: TargetKind.allCases) func verifyNamesACorruptBlockAndAMissingOne(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        let volume = fixture.randomVolume(size: 4 * Self.blockSize, seed: 6, zeroBlocks: [])
        let summary = try fixture.backUp(volume, name: "db")
        let hashes = try fixture.store.map(summary.id).blocks.map(\.hash)
        try fixture.store.target.delete([StoreKey.block(hashes[0])])
        var stored = try #require(try fixture.store.target.get(StoreKey.block(hashes[1])))
        stored[stored.count / 2] ^= 0xFF
        try fixture.store.target.put(StoreKey.block(hashes[1]), stored)

        let report = try fixture.store.verify()
        #expect(report.missing.keys.sorted() == [hashes[0]])
        #expect(report.corrupt.keys.sorted() == [hashes[1]])
        #expect(report.missing[hashes[0]] == [summary.id])
        let quick = try fixture.store.verify(quick: true)
        #expect(quick.missing.keys.sorted() == [hashes[0]])
        #expect(quick.corrupt.isEmpty)
        #expect(throws: (any Error).self) { try BackupRestorer(store: fixture.store, id: summary.id).run(to: .file(fixture.path("r.img"))) }
        #expect(!FileManager.default.fileExists(atPath: fixture.path("r.img")))
    }

    @Test(arguments: TargetKind.allCases) func aBackupWithoutItsSummaryIsNeverListedAndGCRemovesItsMap(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        let volume = fixture.randomVolume(size: 2 * Self.blockSize, seed: 7, zeroBlocks: [])
        let summary = try fixture.backUp(volume, name: "db")
        // What a backup killed between its map and its summary leaves.
        try fixture.store.target.delete([StoreKey.backup(summary.id)])
        #expect(try fixture.store.backups().isEmpty)
        #expect(throws: (any Error).self) { try fixture.store.summary(summary.id) }
        let report = try fixture.store.collectGarbage(holder: "test")
        #expect(report.orphanMapsRemoved == 1)
        #expect(report.blocksFreed == 2)
        #expect(try fixture.store.target.list("").map(\.key) == [StoreKey.config])
    }

    @Test(arguments: TargetKind.allCases) func gcAndABackupNeverRunTogether(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        let volume = fixture.randomVolume(size: Self.blockSize, seed: 8, zeroBlocks: [])
        _ = try fixture.backUp(volume, name: "db")
        let lock = try JSONEncoder().encode(StoreLock(holder: "backup elsewhere", expires: Int64(Date().timeIntervalSince1970) + 600))
        try fixture.store.target.put(StoreKey.backupLock("bk-other"), Array(lock))
        #expect(throws: (any Error).self) { try fixture.store.collectGarbage(holder: "test") }
        #expect(try !fixture.store.target.exists(StoreKey.gcLock))
        try fixture.store.target.delete([StoreKey.backupLock("bk-other")])

        try fixture.store.target.put(StoreKey.gcLock, Array(lock))
        #expect(throws: (any Error).self) { try fixture.backUp(volume, name: "db") }
        #expect(try fixture.store.backups().count == 1)
        // An expired gc lock is taken over.
        let expired = try JSONEncoder().encode(StoreLock(holder: "dead gc", expires: 1))
        try fixture.store.target.put(StoreKey.gcLock, Array(expired))
        #expect(try fixture.store.collectGarbage(holder: "test").backupsKept == 1)
    }

    @Test(arguments: TargetKind.allCases) func aStoreOfAnotherFormatIsRefusedWithTheReason(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        try fixture.store.target.put(StoreKey.config, Array(#"{"format": 2, "blockSize": 2097152}"#.utf8))
        do {
            _ = try BackupStore.open(fixture.store.target)
            Issue.record("a format 2 store opened")
        } catch {
            #expect("\(error)".contains("format 2"))
        }
        #expect(throws: (any Error).self) { try BackupStore.open(try openBackupTarget("file://relative/dir")) }
        #expect(throws: (any Error).self) { try BackupStore.open(try openBackupTarget("file:///nonexistent/keel-store")) }
        #expect(throws: (any Error).self) { try fixture.store.summary("bk-none") }
    }

    @Test func s3RefusesAWrongSecretInOneLine() throws {
        do {
            _ = try openBackupTarget(S3TestServer.url("wrong-secret"), s3Settings: try S3TestServer.settings(secret: "not-the-secret"))
            Issue.record("a wrong secret was accepted")
        } catch {
            #expect("\(error)".contains("refused our credentials"), "\(error)")
        }
    }

    @Test func s3PutIfAbsentIsOneConditionalWrite() throws {
        let target = try openBackupTarget(S3TestServer.url("conditional-\(UUID().uuidString.prefix(8))"), s3Settings: try S3TestServer.settings())
        #expect(try target.putIfAbsent("locks/gc.json", Array("first".utf8)))
        #expect(try !target.putIfAbsent("locks/gc.json", Array("second".utf8)))
        #expect(try target.get("locks/gc.json") == Array("first".utf8))
        #expect(try target.get("locks/none.json") == nil)
        try target.delete(["locks/gc.json", "locks/none.json"])
        #expect(try target.list("").isEmpty)
    }

    @Test func s3ListsPastOnePage() throws {
        let target = try openBackupTarget(S3TestServer.url("paging-\(UUID().uuidString.prefix(8))"), s3Settings: try S3TestServer.settings())
        let keys = (0 ..< 1010).map { "blocks/\(String(format: "%04d", $0))" }
        let group = DispatchGroup()
        let failed = Counter()
        for slice in 0 ..< 8 {
            DispatchQueue.global().async(group: group) {
                for key in keys.enumerated().filter({ $0.offset % 8 == slice }).map(\.element) where (try? target.put(key, [1])) == nil {
                    failed.add()
                }
            }
        }
        group.wait()
        #expect(failed.value == 0)
        #expect(try target.list("blocks/").map(\.key) == keys)
        try target.delete(keys)
        #expect(try target.list("").isEmpty)
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}
