/*
 * Per-SA cipher contexts over OpenSSL EVP: the twin of ipsecstack/crypto/contexts.py.
 *
 * Every SA owns one EVP_CIPHER_CTX (and, for encrypt-then-MAC suites, one EVP_MAC_CTX), keyed once
 * at install time; a packet only sets the nonce/IV (EVP_*Init_ex with a NULL key keeps the key
 * schedule) or re-initialises the HMAC with the key it already holds.
 *
 * Buffer layout of `esp` for ips_seal: the 8-byte ESP header (SPI, low sequence number), iv_len
 * bytes of room for the IV, pt_len bytes of plaintext (payload, padding, pad length, next header)
 * encrypted in place, then icv_len bytes of room for the ICV.
 *
 * AEAD (RFC 4106 §3-5, RFC 7634 §2-3): nonce = salt || IV, IV = the 64-bit sequence number (unique
 * per key because the sender never wraps), AAD = SPI || seq, or SPI || seq_hi || seq_low with ESN.
 *
 * AES-CBC + HMAC (RFC 3602, RFC 4868, RFC 4303 §3.3.2.1): the outbound context is one CBC stream
 * that starts from a zero IV and is never reset, exactly as the Python context keeps one
 * `cryptography` encryptor: each packet feeds 16 random bytes r first, and its ciphertext
 * E(r xor previous block) becomes the packet's IV, unpredictable as RFC 3602 §2 requires; the
 * plaintext follows, chained from it. Given the same r, both engines produce the same bytes. The
 * ICV is HMAC(header || IV || ciphertext [|| seq_hi]) truncated to icv_len. Inbound, the ICV is
 * checked first (constant time), then the ciphertext is decrypted from the packet's own IV.
 */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "engine.h"

static const ips_suite SUITES[] = {
    {"aes128gcm16", IPS_GCM, 16, 4, 0, 8, 4, 16, NULL},
    {"aes192gcm16", IPS_GCM, 24, 4, 0, 8, 4, 16, NULL},
    {"aes256gcm16", IPS_GCM, 32, 4, 0, 8, 4, 16, NULL},
    {"chacha20poly1305", IPS_CHACHA, 32, 4, 0, 8, 4, 16, NULL},
    {"aes128-sha256", IPS_CBC, 16, 0, 32, 16, 16, 16, "SHA256"},
    {"aes128-sha384", IPS_CBC, 16, 0, 48, 16, 16, 24, "SHA384"},
    {"aes128-sha512", IPS_CBC, 16, 0, 64, 16, 16, 32, "SHA512"},
    {"aes192-sha256", IPS_CBC, 24, 0, 32, 16, 16, 16, "SHA256"},
    {"aes192-sha384", IPS_CBC, 24, 0, 48, 16, 16, 24, "SHA384"},
    {"aes192-sha512", IPS_CBC, 24, 0, 64, 16, 16, 32, "SHA512"},
    {"aes256-sha256", IPS_CBC, 32, 0, 32, 16, 16, 16, "SHA256"},
    {"aes256-sha384", IPS_CBC, 32, 0, 48, 16, 16, 24, "SHA384"},
    {"aes256-sha512", IPS_CBC, 32, 0, 64, 16, 16, 32, "SHA512"},
    {"null-sha256", IPS_NULL, 0, 0, 32, 0, 4, 16, "SHA256"},
    {"null-sha384", IPS_NULL, 0, 0, 48, 0, 4, 24, "SHA384"},
    {"null-sha512", IPS_NULL, 0, 0, 64, 0, 4, 32, "SHA512"},
};
#define NSUITES (sizeof(SUITES) / sizeof(SUITES[0]))

const ips_suite *ips_suite_find(const char *keyword)
{
    for (size_t i = 0; i < NSUITES; i++)
        if (strcmp(SUITES[i].keyword, keyword) == 0)
            return &SUITES[i];
    return NULL;
}

const ips_suite *ips_suite_at(size_t i)
{
    return i < NSUITES ? &SUITES[i] : NULL;
}

static const EVP_CIPHER *evp_cipher(const ips_suite *s)
{
    switch (s->kind) {
    case IPS_GCM:
        return s->key_len == 16 ? EVP_aes_128_gcm() : s->key_len == 24 ? EVP_aes_192_gcm() : EVP_aes_256_gcm();
    case IPS_CHACHA:
        return EVP_chacha20_poly1305();
    case IPS_CBC:
        return s->key_len == 16 ? EVP_aes_128_cbc() : s->key_len == 24 ? EVP_aes_192_cbc() : EVP_aes_256_cbc();
    default:
        return NULL;
    }
}

static int init_mac(ips_cipher *c, const uint8_t *key, int key_len)
{
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL)
        return -1;
    c->mac = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac); /* the context holds its own reference */
    if (c->mac == NULL)
        return -1;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)c->suite->digest, 0),
        OSSL_PARAM_construct_end(),
    };
    return EVP_MAC_init(c->mac, key, (size_t)key_len, params) == 1 ? 0 : -1;
}

static int init_cipher(ips_cipher *c, const uint8_t *key, int encrypt)
{
    static const uint8_t zero_iv[16];
    const ips_suite *s = c->suite;
    c->cctx = EVP_CIPHER_CTX_new();
    if (c->cctx == NULL)
        return -1;
    if (EVP_CipherInit_ex(c->cctx, evp_cipher(s), NULL, NULL, NULL, encrypt) != 1)
        return -1;
    if (s->kind == IPS_CBC) {
        if (EVP_CIPHER_CTX_set_padding(c->cctx, 0) != 1)
            return -1;
        return EVP_CipherInit_ex(c->cctx, NULL, NULL, key, zero_iv, encrypt) == 1 ? 0 : -1;
    }
    if (EVP_CIPHER_CTX_ctrl(c->cctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) != 1)
        return -1;
    return EVP_CipherInit_ex(c->cctx, NULL, NULL, key, NULL, encrypt) == 1 ? 0 : -1;
}

/* Key material in RFC 7296 §2.17 order: cipher key, then the AEAD salt or the integrity key. */
int ips_cipher_init(ips_cipher *c, const ips_suite *s, const uint8_t *key, int encrypt, const char **why)
{
    memset(c, 0, sizeof(*c));
    c->suite = s;
    if (s->kind != IPS_NULL && init_cipher(c, key, encrypt) != 0) {
        *why = "OpenSSL refused the cipher key";
        goto fail;
    }
    if (s->salt_len)
        memcpy(c->salt, key + s->key_len, 4);
    if (s->digest != NULL && init_mac(c, key + s->key_len, s->integ_key_len) != 0) {
        *why = "OpenSSL refused the HMAC key";
        goto fail;
    }
    return 0;
fail:
    ERR_clear_error();
    ips_cipher_free(c);
    return -1;
}

void ips_cipher_free(ips_cipher *c)
{
    EVP_CIPHER_CTX_free(c->cctx);
    EVP_MAC_CTX_free(c->mac);
    c->cctx = NULL;
    c->mac = NULL;
    OPENSSL_cleanse(c->salt, sizeof(c->salt));
}

/* AAD of RFC 4106 §5 / RFC 7634 §2.1: SPI || [seq_hi ||] seq_low. Returns its length. */
static int aead_aad(const uint8_t *header, const uint8_t *seq_hi, uint8_t aad[12])
{
    if (seq_hi == NULL) {
        memcpy(aad, header, 8);
        return 8;
    }
    memcpy(aad, header, 4);
    memcpy(aad + 4, seq_hi, 4);
    memcpy(aad + 8, header + 4, 4);
    return 12;
}

/* The ESP ICV of encrypt-then-MAC suites (RFC 4303 §2.8, §3.3.2.1): HMAC over `data` (header ||
 * IV || ciphertext) and, with ESN, the high sequence bits, truncated per RFC 4868 §2.3. */
static int hmac_icv(ips_cipher *c, const uint8_t *data, size_t len, const uint8_t *seq_hi, uint8_t *icv)
{
    uint8_t full[EVP_MAX_MD_SIZE];
    size_t out = 0;
    if (EVP_MAC_init(c->mac, NULL, 0, NULL) != 1 || EVP_MAC_update(c->mac, data, len) != 1)
        return -1;
    if (seq_hi != NULL && EVP_MAC_update(c->mac, seq_hi, 4) != 1)
        return -1;
    if (EVP_MAC_final(c->mac, full, &out, sizeof(full)) != 1 || out < (size_t)c->suite->icv_len)
        return -1;
    memcpy(icv, full, (size_t)c->suite->icv_len);
    return 0;
}

static int seal_aead(ips_cipher *c, uint8_t *esp, size_t pt_len, uint64_t seq, const uint8_t *seq_hi)
{
    uint8_t nonce[12], aad[12];
    uint8_t *iv = esp + 8, *pt = esp + 16;
    int n = 0, fin = 0;
    for (int i = 0; i < 8; i++)
        iv[i] = (uint8_t)(seq >> (56 - 8 * i)); /* RFC 4106 §3: the IV is the sequence counter */
    memcpy(nonce, c->salt, 4);
    memcpy(nonce + 4, iv, 8);
    int aad_len = aead_aad(esp, seq_hi, aad);
    if (EVP_EncryptInit_ex(c->cctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(c->cctx, NULL, &n, aad, aad_len) != 1 ||
        EVP_EncryptUpdate(c->cctx, pt, &n, pt, (int)pt_len) != 1 ||
        EVP_EncryptFinal_ex(c->cctx, pt + n, &fin) != 1 ||
        EVP_CIPHER_CTX_ctrl(c->cctx, EVP_CTRL_AEAD_GET_TAG, 16, pt + pt_len) != 1)
        return -1;
    return 0;
}

static int seal_cbc(ips_cipher *c, uint8_t *esp, size_t pt_len, const uint8_t *seq_hi, const uint8_t *rand16)
{
    uint8_t *iv = esp + 8;
    int n = 0;
    if (rand16 != NULL)
        memcpy(iv, rand16, 16);
    else if (RAND_bytes(iv, 16) != 1)
        return -1;
    /* r || plaintext through the never-reset stream: the first output block is the IV */
    if (EVP_EncryptUpdate(c->cctx, iv, &n, iv, (int)(16 + pt_len)) != 1 || (size_t)n != 16 + pt_len)
        return -1;
    return hmac_icv(c, esp, 8 + 16 + pt_len, seq_hi, iv + 16 + pt_len);
}

int ips_seal(ips_cipher *c, uint8_t *esp, size_t pt_len, uint64_t seq, const uint8_t *seq_hi, const uint8_t *rand16)
{
    int r;
    switch (c->suite->kind) {
    case IPS_GCM:
    case IPS_CHACHA:
        r = seal_aead(c, esp, pt_len, seq, seq_hi);
        break;
    case IPS_CBC:
        r = seal_cbc(c, esp, pt_len, seq_hi, rand16);
        break;
    default: /* ENCR_NULL: the payload travels in clear, the ICV covers header || payload */
        r = hmac_icv(c, esp, 8 + pt_len, seq_hi, esp + 8 + pt_len);
        break;
    }
    if (r != 0)
        ERR_clear_error();
    return r;
}

static ips_reason open_aead(ips_cipher *c, const uint8_t *esp, size_t body_len, const uint8_t *seq_hi, uint8_t *dst,
                            size_t *pt_len)
{
    const uint8_t *body = esp + 8;
    uint8_t nonce[12], aad[12];
    int n = 0, fin = 0;
    if (body_len < 8 + 16 + 2)
        return IPS_R_TRUNCATED;
    size_t ct_len = body_len - 8 - 16;
    memcpy(nonce, c->salt, 4);
    memcpy(nonce + 4, body, 8);
    int aad_len = aead_aad(esp, seq_hi, aad);
    if (EVP_DecryptInit_ex(c->cctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(c->cctx, NULL, &n, aad, aad_len) != 1 ||
        EVP_DecryptUpdate(c->cctx, dst, &n, body + 8, (int)ct_len) != 1 ||
        EVP_CIPHER_CTX_ctrl(c->cctx, EVP_CTRL_AEAD_SET_TAG, 16, (void *)(body + 8 + ct_len)) != 1)
        return IPS_R_CRYPTO_ERROR;
    if (EVP_DecryptFinal_ex(c->cctx, dst + n, &fin) != 1)
        return IPS_R_BAD_ICV;
    *pt_len = ct_len;
    return IPS_OK;
}

static ips_reason check_icv(ips_cipher *c, const uint8_t *esp, size_t covered, const uint8_t *seq_hi)
{
    uint8_t icv[EVP_MAX_MD_SIZE];
    if (hmac_icv(c, esp, covered, seq_hi, icv) != 0)
        return IPS_R_CRYPTO_ERROR;
    return CRYPTO_memcmp(icv, esp + covered, (size_t)c->suite->icv_len) == 0 ? IPS_OK : IPS_R_BAD_ICV;
}

static ips_reason open_cbc(ips_cipher *c, const uint8_t *esp, size_t body_len, const uint8_t *seq_hi, uint8_t *dst,
                           size_t *pt_len)
{
    size_t icv_len = (size_t)c->suite->icv_len;
    if (body_len < icv_len || body_len - icv_len < 32)
        return IPS_R_TRUNCATED;
    size_t n = body_len - icv_len; /* IV + ciphertext */
    if (n % 16)
        return IPS_R_BAD_LENGTH;
    ips_reason r = check_icv(c, esp, 8 + n, seq_hi);
    if (r != IPS_OK)
        return r;
    int out = 0;
    if (EVP_DecryptInit_ex(c->cctx, NULL, NULL, NULL, esp + 8) != 1 ||
        EVP_DecryptUpdate(c->cctx, dst, &out, esp + 8 + 16, (int)(n - 16)) != 1 || (size_t)out != n - 16)
        return IPS_R_CRYPTO_ERROR;
    *pt_len = n - 16;
    return IPS_OK;
}

static ips_reason open_null(ips_cipher *c, const uint8_t *esp, size_t body_len, const uint8_t *seq_hi, uint8_t *dst,
                            size_t *pt_len)
{
    size_t icv_len = (size_t)c->suite->icv_len;
    if (body_len < icv_len || body_len - icv_len < 2)
        return IPS_R_TRUNCATED;
    size_t n = body_len - icv_len;
    ips_reason r = check_icv(c, esp, 8 + n, seq_hi);
    if (r != IPS_OK)
        return r;
    memcpy(dst, esp + 8, n);
    *pt_len = n;
    return IPS_OK;
}

/* Verify and decrypt the ESP body (IV || ciphertext || ICV, body_len bytes after the 8-byte header
 * at `esp`) into `dst`, which has room for body_len bytes and does not overlap `esp`. */
ips_reason ips_open(ips_cipher *c, const uint8_t *esp, size_t body_len, const uint8_t *seq_hi, uint8_t *dst,
                    size_t *pt_len)
{
    ips_reason r;
    switch (c->suite->kind) {
    case IPS_GCM:
    case IPS_CHACHA:
        r = open_aead(c, esp, body_len, seq_hi, dst, pt_len);
        break;
    case IPS_CBC:
        r = open_cbc(c, esp, body_len, seq_hi, dst, pt_len);
        break;
    default:
        r = open_null(c, esp, body_len, seq_hi, dst, pt_len);
        break;
    }
    if (r != IPS_OK)
        ERR_clear_error();
    return r;
}
