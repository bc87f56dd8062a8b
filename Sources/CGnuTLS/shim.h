#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <gnutls/socket.h>

// Kernel TLS (kTLS): a TLS 1.3 AES-GCM session's record layer handed to the socket.
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/tls.h>
#ifndef SOL_TLS
#define SOL_TLS 282
#endif
#ifndef TCP_ULP
#define TCP_ULP 31
#endif

// Attaches the kernel's TLS upper layer to a TCP socket: 0, or -1 with errno (ENOENT: no tls module).
static inline int keel_ktls_attach(int fd) {
    return setsockopt(fd, SOL_TCP, TCP_ULP, "tls", sizeof "tls");
}

// One direction (TLS_TX or TLS_RX) of a TLS 1.3 AES-GCM session: the key (16 or 32 bytes),
// the 12-byte IV (salt, then the rest) and the next record's 8-byte sequence number.
#define KEEL_KTLS_FILL(info, cipher, key, iv12, seq8) do {      \
        memset(&(info), 0, sizeof (info));                      \
        (info).info.version = TLS_1_3_VERSION;                  \
        (info).info.cipher_type = (cipher);                     \
        memcpy((info).salt, (iv12), 4);                         \
        memcpy((info).iv, (iv12) + 4, 8);                       \
        memcpy((info).key, (key), sizeof (info).key);           \
        memcpy((info).rec_seq, (seq8), 8);                      \
    } while (0)
static inline int keel_ktls_set(int fd, int direction, const unsigned char *key, int key_length,
                                const unsigned char *iv12, const unsigned char *seq8) {
    if (key_length == 16) {
        struct tls12_crypto_info_aes_gcm_128 info;
        KEEL_KTLS_FILL(info, TLS_CIPHER_AES_GCM_128, key, iv12, seq8);
        return setsockopt(fd, SOL_TLS, direction, &info, sizeof info);
    }
    struct tls12_crypto_info_aes_gcm_256 info;
    KEEL_KTLS_FILL(info, TLS_CIPHER_AES_GCM_256, key, iv12, seq8);
    return setsockopt(fd, SOL_TLS, direction, &info, sizeof info);
}
static const int keel_tls_tx = TLS_TX;
static const int keel_tls_rx = TLS_RX;
