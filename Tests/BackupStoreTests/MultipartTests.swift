@testable import BackupStore
import Foundation
import S3Client
import Testing

/// Large objects as S3 multipart uploads.
@Suite struct MultipartTests {
    static let mebibyte = 1 << 20

    /// An S3 target under a fresh prefix, taking parts of 5 MiB from 6 MiB on.
    static func target(_ name: String) throws -> S3Target {
        let target = try #require(try openBackupTarget(S3TestServer.url("\(name)-\(UUID().uuidString.prefix(8))"),
                                                       s3Settings: try S3TestServer.settings()) as? S3Target)
        target.multipartThreshold = 6 * mebibyte
        target.multipartPartSize = 5 * mebibyte
        return target
    }

    static func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
        var random = Fixture.Random(seed: seed)
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { raw in
            for word in 0 ..< count / 8 { raw.storeBytes(of: random.next(), toByteOffset: word * 8, as: UInt64.self) }
        }
        return bytes
    }

    @Test func s3PutsALargeObjectInPartsAndReadsItBackWhole() throws {
        let target = try Self.target("multipart")
        let bytes = Self.randomBytes(13 * Self.mebibyte, seed: 20)
        try target.put("maps/large.json.zst", bytes)
        #expect(try target.get("maps/large.json.zst") == bytes)
        let listed = try target.list("maps/")
        #expect(listed.map(\.key) == ["maps/large.json.zst"])
        #expect(listed.map(\.size) == [bytes.count])
        // A multipart object's ETag is the MD5 of its parts' MD5s and their count: 5 + 5 + 3 MiB.
        let head = try S3Client(settings: try S3TestServer.settings())
            .send(.HEAD, bucket: target.bucket, key: target.prefix + "maps/large.json.zst")
        #expect(head.header("etag")?.hasSuffix("-3\"") ?? false, "\(head.headers)")

        // At the threshold: one PUT.
        try target.put("maps/small.json.zst", Array(bytes.prefix(target.multipartThreshold)))
        let small = try S3Client(settings: try S3TestServer.settings())
            .send(.HEAD, bucket: target.bucket, key: target.prefix + "maps/small.json.zst")
        #expect(!(small.header("etag")?.contains("-") ?? true), "\(small.headers)")
        try target.delete(["maps/large.json.zst", "maps/small.json.zst"])
        #expect(try target.list("").isEmpty)
    }

    @Test func s3AMultipartUploadTheServerRefusesIsAbortedAndToldInOneLine() throws {
        let target = try Self.target("refused")
        // Parts under S3's 5 MiB least: the completion is refused.
        target.multipartThreshold = 2 * Self.mebibyte
        target.multipartPartSize = Self.mebibyte
        do {
            try target.put("maps/refused.json.zst", Self.randomBytes(3 * Self.mebibyte, seed: 21))
            Issue.record("parts of 1 MiB were accepted")
        } catch {
            #expect("\(error)".contains("maps/refused.json.zst"), "\(error)")
            #expect(!"\(error)".contains("\n"), "\(error)")
            print("refused multipart upload: \(error)")
        }
        #expect(try target.get("maps/refused.json.zst") == nil)
    }

    @Test func aCompletionAnsweredWithAnErrorIsToldFromItsRoot() {
        // S3 may answer a CompleteMultipartUpload 200 and an <Error> (SeaweedFS answers 400).
        let error = Array(#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>x</Message></Error>"#.utf8)
        let done = Array(#"<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#
            .utf8) + Array(#"<ETag>"e-2"</ETag></CompleteMultipartUploadResult>"#.utf8)
        #expect(XMLRootParser.parse(error) == "Error")
        #expect(XMLRootParser.parse(done) == "CompleteMultipartUploadResult")
        #expect(XMLRootParser.parse([]) == nil)
    }
}
