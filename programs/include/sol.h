/* The little of Solana's C SDK a program here needs: fixed-width types, the runtime's
 * input layout (SBPF v0, aligned loader), account and instruction structs for
 * cross-program invocation, and the syscalls. Freestanding: no libc. */
#pragma once

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef signed long int64_t;
typedef uint64_t size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define SIZE_PUBKEY 32
#define MAX_ACCOUNTS 16
#define MAX_PERMITTED_DATA_INCREASE (10 * 1024)
#define HEAP_START 0x300000000UL
#define HEAP_LENGTH (32 * 1024)

typedef struct { uint8_t x[SIZE_PUBKEY]; } SolPubkey;

typedef struct {
  SolPubkey *key;
  uint64_t *lamports;
  uint64_t data_len;
  uint8_t *data;
  SolPubkey *owner;
  uint64_t rent_epoch;
  bool is_signer;
  bool is_writable;
  bool executable;
} SolAccountInfo;

typedef struct {
  SolAccountInfo ka[MAX_ACCOUNTS];
  uint64_t ka_num;
  const uint8_t *data;
  uint64_t data_len;
  const SolPubkey *program_id;
  uint8_t dup_of[MAX_ACCOUNTS]; /* index of the account this one repeats, or itself */
} SolParameters;

typedef struct { SolPubkey *pubkey; bool is_writable; bool is_signer; } SolAccountMeta;
typedef struct {
  SolPubkey *program_id;
  SolAccountMeta *accounts;
  uint64_t account_len;
  uint8_t *data;
  uint64_t data_len;
} SolInstruction;
typedef struct { const uint8_t *addr; uint64_t len; } SolSignerSeed;
typedef struct { const SolSignerSeed *addr; uint64_t len; } SolSignerSeeds;
typedef struct { const uint8_t *addr; uint64_t len; } SolBytes;

typedef struct {
  uint64_t slot;
  int64_t epoch_start_timestamp;
  uint64_t epoch;
  uint64_t leader_schedule_epoch;
  int64_t unix_timestamp;
} SolClock;

/* syscalls (resolved by name at load) */
void sol_log_(const char *, uint64_t);
void sol_log_64_(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);
void sol_log_pubkey(const SolPubkey *);
void sol_panic_(const char *, uint64_t, uint64_t, uint64_t);
uint64_t sol_sha256(const SolBytes *, int, uint8_t *);
void *sol_memcpy_(void *, const void *, uint64_t);
void *sol_memset_(void *, int, uint64_t);
void sol_memcmp_(const void *, const void *, uint64_t, int *);
uint64_t sol_try_find_program_address(const SolSignerSeed *, int, const SolPubkey *,
                                      SolPubkey *, uint8_t *);
uint64_t sol_create_program_address(const SolSignerSeed *, int, const SolPubkey *,
                                    SolPubkey *);
uint64_t sol_invoke_signed_c(const SolInstruction *, const SolAccountInfo *, int,
                             const SolSignerSeeds *, int);
uint64_t sol_get_clock_sysvar(void *);
uint64_t sol_get_rent_sysvar(void *);

/* LLVM emits these for struct copies and zeroing */
void *memcpy(void *dst, const void *src, size_t n) { return sol_memcpy_(dst, src, n); }
void *memset(void *dst, int c, size_t n) { return sol_memset_(dst, c, n); }

#define sol_log(s) sol_log_(s, sizeof(s) - 1)

static bool sol_pubkey_eq(const SolPubkey *a, const SolPubkey *b) {
  int result = 1;
  sol_memcmp_(a, b, SIZE_PUBKEY, &result);
  return result == 0;
}

static bool sol_bytes_eq(const uint8_t *a, const uint8_t *b, uint64_t n) {
  int result = 1;
  sol_memcmp_(a, b, n, &result);
  return result == 0;
}

/* The aligned loader's input: accounts (a duplicate names the one it repeats), the
 * instruction data, the program id. Returns false when there are more accounts than
 * MAX_ACCOUNTS. */
static bool sol_deserialize(const uint8_t *input, SolParameters *params) {
  uint64_t count = *(const uint64_t *)input;
  input += sizeof(uint64_t);
  if (count > MAX_ACCOUNTS) return false;
  params->ka_num = count;
  for (uint64_t i = 0; i < count; i++) {
    uint8_t dup = *input;
    input += sizeof(uint8_t);
    if (dup == 0xFF) {
      params->dup_of[i] = (uint8_t)i;
      params->ka[i].is_signer = *input != 0; input += 1;
      params->ka[i].is_writable = *input != 0; input += 1;
      params->ka[i].executable = *input != 0; input += 1;
      input += 4; /* padding */
      params->ka[i].key = (SolPubkey *)input; input += SIZE_PUBKEY;
      params->ka[i].owner = (SolPubkey *)input; input += SIZE_PUBKEY;
      params->ka[i].lamports = (uint64_t *)input; input += sizeof(uint64_t);
      params->ka[i].data_len = *(const uint64_t *)input; input += sizeof(uint64_t);
      params->ka[i].data = (uint8_t *)input;
      input += params->ka[i].data_len + MAX_PERMITTED_DATA_INCREASE;
      input = (const uint8_t *)(((uint64_t)input + 7) & ~7UL);
      params->ka[i].rent_epoch = *(const uint64_t *)input; input += sizeof(uint64_t);
    } else {
      params->dup_of[i] = dup;
      params->ka[i] = params->ka[dup];
      input += 7; /* padding */
    }
  }
  params->data_len = *(const uint64_t *)input;
  input += sizeof(uint64_t);
  params->data = input;
  input += params->data_len;
  params->program_id = (const SolPubkey *)input;
  return true;
}
