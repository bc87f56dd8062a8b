import Crypto
import Foundation

/// AWS Signature Version 4 for S3 requests, header-based (docs: "Authenticating Requests: Using the
/// Authorization Header"). Small on purpose: the canonical request, the string to sign, the key chain.
public struct SigV4: Sendable {
    public var accessKey: String
    public var secretKey: String
    public var region: String
    public var service = "s3"

    public init(accessKey: String, secretKey: String, region: String) {
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.region = region
    }

    public static let emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    /// The Authorization header's value for a request whose headers already hold `host`,
    /// `x-amz-date` and `x-amz-content-sha256` (every header given is signed).
    /// `path` is the URI path as sent (already encoded); `query` the decoded query pairs.
    public func authorization(method: String, path: String, query: [(String, String)], headers: [(String, String)]) -> String {
        let (canonical, signedHeaders) = canonicalRequest(method: method, path: path, query: query, headers: headers)
        let date = headers.first { $0.0.lowercased() == "x-amz-date" }!.1
        let scope = "\(date.prefix(8))/\(region)/\(service)/aws4_request"
        let stringToSign = ["AWS4-HMAC-SHA256", date, scope, hex(SHA256.hash(data: Data(canonical.utf8)))].joined(separator: "\n")
        let signature = hex(HMAC<SHA256>.authenticationCode(for: Data(stringToSign.utf8), using: signingKey(day: String(date.prefix(8)))))
        return "AWS4-HMAC-SHA256 Credential=\(accessKey)/\(scope),SignedHeaders=\(signedHeaders),Signature=\(signature)"
    }

    func canonicalRequest(method: String, path: String, query: [(String, String)], headers: [(String, String)]) -> (String, String) {
        let canonicalQuery = query.map { (Self.encode($0.0), Self.encode($0.1)) }.sorted { ($0.0, $0.1) < ($1.0, $1.1) }
            .map { "\($0.0)=\($0.1)" }.joined(separator: "&")
        let canonicalHeaders = headers.map { (name: $0.0.lowercased(), value: Self.trimmed($0.1)) }.sorted { $0.name < $1.name }
        let signedHeaders = canonicalHeaders.map(\.name).joined(separator: ";")
        let payloadHash = canonicalHeaders.first { $0.name == "x-amz-content-sha256" }?.value ?? Self.emptyPayloadHash
        let request = [method, path.isEmpty ? "/" : path, canonicalQuery,
                       canonicalHeaders.map { "\($0.name):\($0.value)\n" }.joined(), signedHeaders, payloadHash].joined(separator: "\n")
        return (request, signedHeaders)
    }

    func signingKey(day: String) -> SymmetricKey {
        var key = SymmetricKey(data: Data("AWS4\(secretKey)".utf8))
        for part in [day, region, service, "aws4_request"] {
            key = SymmetricKey(data: Data(HMAC<SHA256>.authenticationCode(for: Data(part.utf8), using: key)))
        }
        return key
    }

    /// RFC 3986 percent-encoding of everything but the unreserved characters (and '/' when `keepSlash`).
    public static func encode(_ text: String, keepSlash: Bool = false) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A") ... UInt8(ascii: "Z"), UInt8(ascii: "a") ... UInt8(ascii: "z"), UInt8(ascii: "0") ... UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.append(Character(UnicodeScalar(byte)))
            case UInt8(ascii: "/") where keepSlash:
                out.append("/")
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }

    /// Header values: outer space trimmed, inner runs of spaces made one.
    static func trimmed(_ value: String) -> String {
        value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
    }

    /// `20130524T000000Z`
    public static func timestamp(_ date: Date) -> String {
        let format = DateFormatter()
        format.locale = Locale(identifier: "en_US_POSIX")
        format.timeZone = TimeZone(identifier: "UTC")
        format.dateFormat = "yyyyMMdd'T'HHmmss'Z'"
        return format.string(from: date)
    }
}

func hex<D: Sequence>(_ bytes: D) -> String where D.Element == UInt8 {
    bytes.map { String(format: "%02x", $0) }.joined()
}

public func sha256Hex(_ bytes: [UInt8]) -> String { hex(SHA256.hash(data: bytes)) }
public func md5Base64(_ bytes: [UInt8]) -> String { Data(Insecure.MD5.hash(data: bytes)).base64EncodedString() }
