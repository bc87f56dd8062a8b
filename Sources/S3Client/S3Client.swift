import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1

/// Signed S3 requests over async-http-client, synchronous for the caller's thread (never an event loop),
/// retried with backoff when the server is busy or the connection fails.
public final class S3Client: Sendable {
    public struct Response: Sendable {
        public var status: Int
        public var headers: [(String, String)]
        public var body: [UInt8]

        public func header(_ name: String) -> String? { headers.first { $0.0.lowercased() == name.lowercased() }?.1 }

        /// The S3 error code of an error reply (`<Code>NoSuchBucket</Code>`), if any.
        public var errorCode: String? {
            let text = String(decoding: body, as: UTF8.self)
            guard let start = text.range(of: "<Code>"), let end = text.range(of: "</Code>", range: start.upperBound ..< text.endIndex) else {
                return nil
            }
            return String(text[start.upperBound ..< end.lowerBound])
        }
    }

    public let settings: S3Settings
    let signer: SigV4
    let host: String
    public let attempts = 5
    public let timeout: TimeAmount = .seconds(60)

    /// One client for the process, never shut down. Its connect timeout makes a refused or silent endpoint
    /// fail the attempt (the pool would otherwise keep connecting until the request's deadline).
    static let http: HTTPClient = {
        var configuration = HTTPClient.Configuration()
        configuration.timeout = .init(connect: .seconds(2), read: .seconds(60))
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }()

    public init(settings: S3Settings) {
        self.settings = settings
        signer = SigV4(accessKey: settings.accessKey, secretKey: settings.secretKey, region: settings.region)
        host = String(settings.endpoint.split(separator: "/", maxSplits: 2, omittingEmptySubsequences: true)[1])
    }

    /// One request to `bucket` (and `key`); a 2xx, 3xx or 4xx reply is returned, a 5xx or 429 is retried
    /// (`attempts` in all) and a failed connection 3 times, then thrown.
    public func send(_ method: HTTPMethod, bucket: String, key: String? = nil, query: [(String, String)] = [],
                     headers extra: [(String, String)] = [], body: [UInt8]? = nil) throws -> Response {
        let path = "/" + SigV4.encode(bucket) + (key.map { "/" + SigV4.encode($0, keepSlash: true) } ?? "")
        let queryString = query.map { SigV4.encode($0.0) + "=" + SigV4.encode($0.1) }.joined(separator: "&")
        let url = settings.endpoint + path + (queryString.isEmpty ? "" : "?" + queryString)
        let payloadHash = body.map(sha256Hex) ?? SigV4.emptyPayloadHash
        var lastFailure: Error = S3Error("no attempt made")
        var connectFailures = 0
        for attempt in 0 ..< attempts {
            if attempt > 0 {
                // 0.25 s, 0.5 s, 1 s, 2 s, with up to a quarter more at random so that workers spread out.
                let delay = 0.25 * Double(1 << (attempt - 1))
                Thread.sleep(forTimeInterval: delay + Double.random(in: 0 ... delay / 4))
            }
            var headers = extra + [("host", host), ("x-amz-date", SigV4.timestamp(Date())), ("x-amz-content-sha256", payloadHash)]
            let authorization = signer.authorization(method: method.rawValue, path: path, query: query, headers: headers)
            headers.append(("authorization", authorization))
            do {
                var request = try HTTPClient.Request(url: url, method: method, headers: HTTPHeaders(headers))
                if let body { request.body = .bytes(body) }
                let reply = try Self.http.execute(request: request, deadline: .now() + timeout).wait()
                let response = Response(status: Int(reply.status.code), headers: reply.headers.map { ($0.name, $0.value) },
                                        body: reply.body.map { Array($0.readableBytesView) } ?? [])
                if response.status >= 500 || response.status == 429 {
                    lastFailure = S3Error("\(method) \(path): \(response.status) \(response.errorCode ?? "")", status: response.status)
                    continue
                }
                return response
            } catch {
                lastFailure = S3Error("cannot reach \(settings.endpoint): \(error)")
                // An endpoint that refuses connections is told in seconds, not after every attempt's backoff.
                connectFailures += 1
                if connectFailures == 3 { break }
            }
        }
        throw lastFailure
    }
}
