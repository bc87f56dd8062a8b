import Foundation
import S3Client
#if canImport(FoundationXML)
import FoundationXML
#endif

/// One object written as an S3 multipart upload: started, its parts sent a few at once (each with its
/// Content-MD5), completed with their ETags; aborted on any failure, so that no stored part is left to pay for.
struct MultipartUpload: Sendable {
    let target: S3Target
    let key: String
    let id: String

    static func put(_ key: String, _ bytes: [UInt8], on target: S3Target, partSize: Int, parallel: Int) throws {
        precondition(partSize > 0, "a multipart upload's parts hold bytes")
        let partCount = (bytes.count + partSize - 1) / partSize
        guard partCount <= 10_000 else {
            throw BackupTargetError("\(target.url): cannot store \(key): \(bytes.count) bytes are more than 10000 parts of \(partSize)")
        }
        let upload = try start(key, on: target)
        do {
            let etags = try upload.sendParts(bytes, partSize: partSize, parallel: parallel)
            try upload.complete(etags)
        } catch {
            upload.abort()
            throw error
        }
    }

    static func start(_ key: String, on target: S3Target) throws -> MultipartUpload {
        let response = try target.call(.POST, key: key, query: [("uploads", "")])
        guard response.status == 200, let id = UploadIDParser.parse(response.body) else {
            throw target.failure("start a multipart upload of \(key)", response)
        }
        return MultipartUpload(target: target, key: key, id: id)
    }

    /// The parts' ETags, in part order.
    func sendParts(_ bytes: [UInt8], partSize: Int, parallel: Int) throws -> [String] {
        let numbers = Array(1 ... (bytes.count + partSize - 1) / partSize)
        let tags = PartTags(count: numbers.count)
        WorkerThreads(count: min(parallel, numbers.count)) { _ in
            do {
                while let number = tags.next(of: numbers) {
                    let start = (number - 1) * partSize
                    let part = Array(bytes[start ..< min(start + partSize, bytes.count)])
                    tags.record(number, try send(part: number, of: numbers.count, part))
                }
            } catch {
                tags.fail(error)
            }
        }.wait()
        return try tags.all()
    }

    private func send(part number: Int, of count: Int, _ bytes: [UInt8]) throws -> String {
        let response = try target.call(.PUT, key: key, query: [("partNumber", String(number)), ("uploadId", id)],
                                       headers: [("content-md5", md5Base64(bytes))], body: bytes)
        guard response.status == 200, let etag = response.header("etag") else {
            throw target.failure("store \(key) (part \(number) of \(count))", response)
        }
        return etag
    }

    func complete(_ etags: [String]) throws {
        let parts = etags.enumerated().map {
            "<Part><PartNumber>\($0.offset + 1)</PartNumber><ETag>\(target.xmlEscaped($0.element))</ETag></Part>"
        }
        let body = Array(("<CompleteMultipartUpload>" + parts.joined() + "</CompleteMultipartUpload>").utf8)
        let response = try target.call(.POST, key: key, query: [("uploadId", id)], headers: [("content-md5", md5Base64(body))], body: body)
        // S3 answers 200 before it has joined the parts, so a failure to join comes as an <Error> in a 200.
        guard response.status == 200, XMLRootParser.parse(response.body) == "CompleteMultipartUploadResult" else {
            throw target.failure("store \(key) (completing its \(etags.count) parts)", response)
        }
    }

    /// Best effort: an upload left behind is aborted by the next gc.
    func abort() {
        _ = try? target.call(.DELETE, key: key, query: [("uploadId", id)])
    }
}

/// What the part senders share: the next part to send, the ETags so far, the first failure.
private final class PartTags: @unchecked Sendable {
    private let lock = NSLock()
    private var cursor = 0
    private var etags: [String?]
    private var error: Error?

    init(count: Int) { etags = Array(repeating: nil, count: count) }

    func next(of numbers: [Int]) -> Int? {
        lock.withLock {
            guard error == nil, cursor < numbers.count else { return nil }
            defer { cursor += 1 }
            return numbers[cursor]
        }
    }

    func record(_ number: Int, _ etag: String) { lock.withLock { etags[number - 1] = etag } }

    func fail(_ failure: Error) { lock.withLock { if error == nil { error = failure } } }

    func all() throws -> [String] {
        try lock.withLock {
            if let error { throw error }
            return etags.map { $0! }
        }
    }
}

/// An InitiateMultipartUploadResult's UploadId.
final class UploadIDParser: NSObject, XMLParserDelegate {
    private var id: String?
    private var text = ""

    static func parse(_ body: [UInt8]) -> String? {
        let delegate = UploadIDParser()
        parseXML(body, with: delegate)
        return delegate.id.flatMap { $0.isEmpty ? nil : $0 }
    }

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        text = ""
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }

    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        if name == "UploadId" { id = text }
    }
}

/// The name of a reply's root element (`Error`, or the result the request asked for).
final class XMLRootParser: NSObject, XMLParserDelegate {
    private var root: String?

    static func parse(_ body: [UInt8]) -> String? {
        let delegate = XMLRootParser()
        parseXML(body, with: delegate)
        return delegate.root
    }

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        if root == nil {
            root = name
            parser.abortParsing()
        }
    }
}
