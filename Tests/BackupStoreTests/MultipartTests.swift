@testable import BackupStore
import Foundation
import S3Client
import Testing

/// Large objects as S3 multipart uploads, and gc aborting the uploads writers left unfinished.
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

    /// Starts a multipart upload of `key` and leaves it unfinished, as a writer that died would.
    static func abandonUpload(_ key: String, on target: S3Target) throws {
        let response = try S3Client(settings: try S3TestServer.settings())
            .send(.POST, bucket: target.bucket, key: target.prefix + key, query: [("uploads", "")])
        #expect(response.status == 200, "\(String(decoding: response.body, as: UTF8.self))")
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
        #expect(try target.abortStaleUploads(olderThan: 0) == 0)

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
        #expect(try target.abortStaleUploads(olderThan: 0) == 0)
    }

    @Test(arguments: TargetKind.allCases) func gcAbortsAnUploadLeftUnfinishedOnceItIsStale(on kind: TargetKind) throws {
        let fixture = try Fixture(kind)
        let volume = fixture.randomVolume(size: 2 * StoreConfig.defaultBlockSize, seed: 22, zeroBlocks: [])
        let summary = try fixture.backUp(volume, name: "db")
        let elsewhere = kind == .s3 ? try Self.target("elsewhere") : nil
        switch kind {
        case .directory:
            let directory = fixture.path("store/blocks/ab")
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            #expect(FileManager.default.createFile(atPath: directory + "/.tmp-12345", contents: Data([1, 2, 3])))
        case .s3:
            try Self.abandonUpload("blocks/ab/abandoned", on: try #require(fixture.store.target as? S3Target))
            try Self.abandonUpload("blocks/ab/abandoned", on: try #require(elsewhere))
        }

        // Younger than a lock's lease: a writer may still be at it.
        #expect(try fixture.store.collectGarbage(holder: "test").uploadsAborted == 0)
        let report = try fixture.store.collectGarbage(holder: "test", staleUploadAge: 0)
        #expect(report.uploadsAborted == 1)
        #expect(report.blocksFreed == 0)
        #expect(try fixture.store.target.abortStaleUploads(olderThan: 0) == 0)
        #expect(!FileManager.default.fileExists(atPath: fixture.path("store/blocks/ab/.tmp-12345")))
        // Only the store's own prefix is touched.
        if let elsewhere { #expect(try elsewhere.abortStaleUploads(olderThan: 0) == 1) }
        #expect(try fixture.store.verify().isClean)
        #expect(try fixture.store.backups().map(\.id) == [summary.id])
    }

    @Test func s3AbortsStaleUploadsPageAfterPage() throws {
        let target = try Self.target("upload-pages")
        target.uploadsPerPage = 2
        for index in 0 ..< 5 { try Self.abandonUpload("blocks/0\(index)/abandoned", on: target) }
        #expect(try target.abortStaleUploads(olderThan: 3600) == 0)
        #expect(try target.abortStaleUploads(olderThan: 0) == 5)
        #expect(try target.abortStaleUploads(olderThan: 0) == 0)
    }

    @Test func theUploadListingReadsAWSsFormToo() throws {
        // From the ListMultipartUploads reference: both markers, and times to the millisecond.
        let body = Array("""
            <?xml version="1.0" encoding="UTF-8"?>
            <ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
              <Bucket>bucket</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
              <NextKeyMarker>my-movie.m2ts</NextKeyMarker>
              <NextUploadIdMarker>YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ</NextUploadIdMarker>
              <MaxUploads>3</MaxUploads><IsTruncated>true</IsTruncated>
              <Upload>
                <Key>my-divisor</Key>
                <UploadId>XMgbGlrZSBlbHZpbmcncyBub3QgaGF2aW5nIG11Y2ggbHVjaw</UploadId>
                <Initiator><ID>arn:aws:iam::111122223333:user/user1-11111a31-17b5-4fb7-9df5-b111111f13de</ID></Initiator>
                <Owner><ID>75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a</ID></Owner>
                <StorageClass>STANDARD</StorageClass>
                <Initiated>2010-11-10T20:48:33.000Z</Initiated>
              </Upload>
              <Upload>
                <Key>my-movie.m2ts</Key>
                <UploadId>VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
                <Initiated>2010-11-10T20:48:33Z</Initiated>
              </Upload>
            </ListMultipartUploadsResult>
            """.utf8)
        let page = UploadListingParser.parse(body)
        #expect(page.uploads.map(\.key) == ["my-divisor", "my-movie.m2ts"])
        #expect(page.uploads.map(\.id) == ["XMgbGlrZSBlbHZpbmcncyBub3QgaGF2aW5nIG11Y2ggbHVjaw",
                                           "VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA"])
        #expect(page.uploads.map(\.initiated) == Array(repeating: Date(timeIntervalSince1970: 1_289_422_113), count: 2))
        #expect(page.truncated)
        #expect(page.next == .init(key: "my-movie.m2ts", uploadID: "YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ"))
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
