import Foundation
import NIOHTTP1
import S3Client
#if canImport(FoundationXML)
import FoundationXML
#endif

/// A backup store under a prefix of an S3 bucket. Puts are durable when answered (`makeDurable`
/// has nothing to do); every upload (and every part of one) carries its Content-MD5; an object over
/// `multipartThreshold` goes as a multipart upload; `putIfAbsent` is a conditional PUT
/// (`If-None-Match: *`), never a read then a write.
public final class S3Target: BackupTarget, @unchecked Sendable {
    public let url: String
    let bucket: String
    let prefix: String
    let client: S3Client
    /// Set before the target is shared between threads (tests lower them). S3 takes parts of 5 MiB to 5 GiB,
    /// but the last, and at most 10000 of them.
    public var multipartThreshold = 16 << 20
    public var multipartPartSize = 8 << 20
    let multipartParallel = 4
    /// S3's most; SeaweedFS would answer 10000 unasked.
    var uploadsPerPage = 1000

    init(url: String, settings: S3Settings) throws {
        self.url = url
        let rest = url.dropFirst("s3://".count)
        let parts = rest.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        bucket = String(parts[0])
        guard !bucket.isEmpty else { throw BackupTargetError("\(url) names no bucket: write s3://bucket/prefix") }
        var prefix = parts.count > 1 ? String(parts[1]) : ""
        while prefix.hasSuffix("/") { prefix.removeLast() }
        self.prefix = prefix.isEmpty ? "" : prefix + "/"
        client = S3Client(settings: settings)
        try checkReachable()
    }

    /// One listing of the prefix: a wrong key, an unknown bucket or an unreachable endpoint is told now, in one line.
    private func checkReachable() throws {
        let response = try call(.GET, query: [("list-type", "2"), ("prefix", prefix), ("max-keys", "1")])
        guard response.status == 200 else { throw failure("list", response) }
    }

    public func get(_ key: String) throws -> [UInt8]? {
        let response = try call(.GET, key: key)
        if response.status == 404 { return nil }
        guard response.status == 200 else { throw failure("read \(key)", response) }
        return response.body
    }

    public func exists(_ key: String) throws -> Bool {
        let response = try call(.HEAD, key: key)
        if response.status == 404 { return false }
        guard response.status == 200 else { throw failure("look for \(key)", response) }
        return true
    }

    public func put(_ key: String, _ bytes: [UInt8]) throws {
        if bytes.count > multipartThreshold {
            return try MultipartUpload.put(key, bytes, on: self, partSize: multipartPartSize, parallel: multipartParallel)
        }
        let response = try call(.PUT, key: key, headers: [("content-md5", md5Base64(bytes))], body: bytes)
        guard response.status == 200 else { throw failure("store \(key)", response) }
    }

    /// One PUT, never multipart: what it writes (config, locks) is small, and not every S3 honours
    /// `If-None-Match` on CompleteMultipartUpload.
    public func putIfAbsent(_ key: String, _ bytes: [UInt8]) throws -> Bool {
        precondition(bytes.count <= multipartThreshold, "putIfAbsent writes small objects: \(key) is \(bytes.count) bytes")
        let response = try call(.PUT, key: key, headers: [("content-md5", md5Base64(bytes)), ("if-none-match", "*")], body: bytes)
        if response.status == 412 { return false }
        guard response.status == 200 else { throw failure("store \(key) if absent", response) }
        return true
    }

    public func list(_ listPrefix: String) throws -> [(key: String, size: Int)] {
        var found: [(key: String, size: Int)] = []
        var token: String?
        for _ in 0 ..< 1_000_000 {  // pages of 1000: a billion objects at most
            var query = [("list-type", "2"), ("prefix", prefix + listPrefix)]
            if let token { query.append(("continuation-token", token)) }
            let response = try call(.GET, query: query)
            guard response.status == 200 else { throw failure("list \(listPrefix)", response) }
            let page = ListingParser.parse(response.body)
            found += page.objects.map { (String($0.key.dropFirst(prefix.count)), $0.size) }
            guard page.truncated, let next = page.nextToken else { break }
            token = next
        }
        return found.sorted { $0.key < $1.key }
    }

    public func delete(_ keys: [String]) throws {
        var start = 0
        while start < keys.count {
            let batch = keys[start ..< min(start + 1000, keys.count)]
            start += 1000
            let body = Array(("<Delete><Quiet>true</Quiet>" + batch.map { "<Object><Key>\(xmlEscaped(prefix + $0))</Key></Object>" }.joined()
                + "</Delete>").utf8)
            let response = try call(.POST, query: [("delete", "")], headers: [("content-md5", md5Base64(body))], body: body)
            guard response.status == 200 else { throw failure("remove \(batch.count) object(s)", response) }
            if String(decoding: response.body, as: UTF8.self).contains("<Error>") {
                throw BackupTargetError("\(url): some of \(batch.count) object(s) were not removed: \(String(decoding: response.body.prefix(300), as: UTF8.self))")
            }
        }
    }

    public func makeDurable() throws {}

    /// ListMultipartUploads under the prefix, page after page, aborting each upload started before `now - age`
    /// (an upload whose start cannot be read is left alone).
    public func abortStaleUploads(olderThan age: TimeInterval) throws -> Int {
        let cutoff = Date().addingTimeInterval(-age)
        var aborted = 0
        var markers = UploadListingParser.Markers()
        for _ in 0 ..< 10_000 {  // ten million uploads at most, in pages of 1000
            let query = [("uploads", ""), ("prefix", prefix), ("max-uploads", String(uploadsPerPage))] + markers.query
            let response = try call(.GET, query: query)
            guard response.status == 200 else { throw failure("list multipart uploads", response) }
            let page = UploadListingParser.parse(response.body)
            for upload in page.uploads where upload.key.hasPrefix(prefix) && upload.initiated.map({ $0 <= cutoff }) ?? false {
                let key = String(upload.key.dropFirst(prefix.count))
                let answer = try call(.DELETE, key: key, query: [("uploadId", upload.id)])
                if answer.status == 204 || answer.status == 200 {
                    aborted += 1
                } else if answer.errorCode != "NoSuchUpload" {  // completed or aborted meanwhile: not ours to count
                    throw failure("abort the multipart upload of \(key)", answer)
                }
            }
            // A page that names no way on, or the way it came, is the last (a server may answer either).
            guard page.truncated, !page.next.query.isEmpty, page.next != markers else { break }
            markers = page.next
        }
        return aborted
    }

    func call(_ method: HTTPMethod, key: String? = nil, query: [(String, String)] = [], headers: [(String, String)] = [],
              body: [UInt8]? = nil) throws -> S3Client.Response {
        do {
            return try client.send(method, bucket: bucket, key: key.map { prefix + $0 }, query: query, headers: headers, body: body)
        } catch {
            throw BackupTargetError("\(url): \(error)")
        }
    }

    func failure(_ what: String, _ response: S3Client.Response) -> BackupTargetError {
        let code = response.errorCode ?? "HTTP \(response.status)"
        switch code {
        case "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied":
            return BackupTargetError("\(url): the server refused our credentials (\(code)) to \(what); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        case "NoSuchBucket":
            return BackupTargetError("\(url): no bucket \(bucket) at \(client.settings.endpoint); create it first")
        default:
            return BackupTargetError("\(url): cannot \(what): \(code)")
        }
    }

    func xmlEscaped(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}

/// Feeds an S3 answer's XML to a parser delegate (which keeps what it found).
func parseXML(_ body: [UInt8], with delegate: XMLParserDelegate) {
    let parser = XMLParser(data: Data(body))
    parser.delegate = delegate
    _ = parser.parse()
}

/// A ListObjectsV2 page: its objects' keys and sizes, whether more follow and the token to them.
final class ListingParser: NSObject, XMLParserDelegate {
    var objects: [(key: String, size: Int)] = []
    var truncated = false
    var nextToken: String?
    private var text = ""
    private var key = ""
    private var size = 0

    static func parse(_ body: [UInt8]) -> ListingParser {
        let delegate = ListingParser()
        parseXML(body, with: delegate)
        return delegate
    }

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        text = ""
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }

    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        switch name {
        case "Key": key = text
        case "Size": size = Int(text) ?? 0
        case "Contents": objects.append((key, size))
        case "IsTruncated": truncated = text == "true"
        case "NextContinuationToken": nextToken = text
        default: break
        }
    }
}

/// A ListMultipartUploads page: each upload's key, id and start, whether more follow and the markers to them.
final class UploadListingParser: NSObject, XMLParserDelegate {
    struct Upload {
        var key = ""
        var id = ""
        var initiated: Date?
    }

    /// Where the next page starts. AWS names both markers; SeaweedFS only the upload id one.
    struct Markers: Equatable {
        var key: String?
        var uploadID: String?
        var query: [(String, String)] {
            (key.map { [("key-marker", $0)] } ?? []) + (uploadID.map { [("upload-id-marker", $0)] } ?? [])
        }
    }

    var uploads: [Upload] = []
    var truncated = false
    var next = Markers()
    private var text = ""
    private var upload = Upload()
    // AWS writes 2010-11-10T20:48:33.000Z, SeaweedFS 2010-11-10T20:48:33Z.
    private let fractional = ISO8601DateFormatter()
    private let whole = ISO8601DateFormatter()

    static func parse(_ body: [UInt8]) -> UploadListingParser {
        let delegate = UploadListingParser()
        delegate.fractional.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        parseXML(body, with: delegate)
        return delegate
    }

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        text = ""
        if name == "Upload" { upload = Upload() }
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }

    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        switch name {
        case "Key": upload.key = text
        case "UploadId": upload.id = text
        case "Initiated": upload.initiated = fractional.date(from: text) ?? whole.date(from: text)
        case "Upload": uploads.append(upload)
        case "IsTruncated": truncated = text == "true"
        case "NextKeyMarker": next.key = text.isEmpty ? nil : text
        case "NextUploadIdMarker": next.uploadID = text.isEmpty ? nil : text
        default: break
        }
    }
}
