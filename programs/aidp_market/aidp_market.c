/* aidp_market: Neural Cloud's on-chain program (first slice: config and receipt anchors).
 *
 * Anchor's conventions without Anchor (idl.json beside this file is the interface):
 * an instruction starts with its 8-byte discriminator, sha256("global:<name>")[:8]; an
 * account's data with sha256("account:<Name>")[:8]; everything after is Borsh. Every
 * check Anchor would generate is written out here: signers, owners, PDA seeds and bumps,
 * discriminators, sizes, duplicate accounts, arithmetic bounds, rent. The constants
 * named DISC_* come from discriminators.h, which programs/build.py writes from the IDL.
 */
#include "sol.h"
#include "discriminators.h"

/* errors (idl.json "errors"; Anchor numbers user errors from 6000) */
#define ERR_UNAUTHORIZED 6000
#define ERR_INVALID_ACCOUNT 6001
#define ERR_ALREADY_EXISTS 6002
#define ERR_INVALID_ARGUMENT 6003
#define ERR_UNKNOWN_INSTRUCTION 6004
#define ERR_DUPLICATE_ACCOUNT 6005

#define MAX_VERIFIERS 8
#define MAX_FEE_BPS 10000
#define MAX_UNBONDING_PERIOD (10L * 365 * 86400) /* keeps time arithmetic far from overflow */
#define MAX_CHALLENGE_PERIOD (30L * 86400)
/* a slash's verdict signatures must fit one transaction with the rest of its evidence */
#define MAX_QUORUM 4

/* MarketConfig (Borsh, after the discriminator) */
#define CFG_AUTHORITY 8
#define CFG_MINT 40
#define CFG_TREASURY 72
#define CFG_FEE_BPS 104
#define CFG_QUORUM 106
#define CFG_VERIFIER_COUNT 107
#define CFG_VERIFIERS 108
#define CFG_MIN_STAKE (CFG_VERIFIERS + 32 * MAX_VERIFIERS)
#define CFG_UNBONDING (CFG_MIN_STAKE + 8)
#define CFG_MAX_SLASH (CFG_UNBONDING + 8)
#define CFG_CHALLENGE_PERIOD (CFG_MAX_SLASH + 8)
#define CFG_BUMP (CFG_CHALLENGE_PERIOD + 8)
#define CONFIG_SIZE (CFG_BUMP + 1)

/* NodeStake: one per operator, PDA ["stake", operator]; its tokens sit in the vault, a
 * token account PDA ["vault", operator] whose authority is the stake account itself, so
 * only this program, by the rules below, moves them */
#define STK_OPERATOR 8
#define STK_VAULT 40
#define STK_STAKED 72
#define STK_UNBONDING 80
#define STK_UNBOND_AT 88
#define STK_CHALLENGE_UNTIL 96
#define STK_SLASHED 104
#define STK_OPEN_CASES 112
#define STK_BUMP 116
#define STK_VAULT_BUMP 117
#define STAKE_SIZE 118
#define TOKEN_ACCOUNT_SIZE 165

/* ReceiptAnchor */
#define ANC_ROOT 8
#define ANC_LEAF_COUNT 40
#define ANC_SLOT 48
#define ANC_BUMP 56
#define ANCHOR_SIZE 57

static const SolPubkey SYSTEM_PROGRAM = {{0}};
/* TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA */
static const SolPubkey TOKEN_PROGRAM = {{
    6, 221, 246, 225, 215, 101, 161, 147, 217, 203, 225, 70, 206, 235, 121, 172,
    28, 180, 133, 237, 95, 91, 55, 145, 58, 140, 245, 133, 126, 255, 0, 169}};

/* ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL */
static const SolPubkey ASSOCIATED_TOKEN_PROGRAM = {{
    140, 151, 37, 143, 78, 36, 137, 241, 187, 61, 16, 41, 20, 142, 13, 131,
    11, 90, 19, 153, 218, 255, 16, 132, 4, 142, 123, 216, 219, 233, 248, 89}};
/* BPFLoaderUpgradeab1e11111111111111111111111 */
static const SolPubkey UPGRADEABLE_LOADER = {{
    2, 168, 246, 145, 78, 136, 161, 176, 226, 16, 21, 62, 247, 99, 174, 43,
    0, 194, 185, 61, 22, 193, 36, 210, 192, 83, 122, 16, 4, 128, 0, 0}};

static const uint8_t SEED_CONFIG[] = "config";
static const uint8_t SEED_ANCHOR[] = "anchor";
static const uint8_t SEED_STAKE[] = "stake";
static const uint8_t SEED_VAULT[] = "vault";

/* ---- little-endian fields at any alignment -------------------------------------------- */

static uint64_t get_u64(const uint8_t *p) {
  uint64_t v;
  sol_memcpy_(&v, p, 8);
  return v;
}
static void put_u64(uint8_t *p, uint64_t v) { sol_memcpy_(p, &v, 8); }
static uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get_u32(const uint8_t *p) {
  uint32_t v;
  sol_memcpy_(&v, p, 4);
  return v;
}
static void put_u32(uint8_t *p, uint32_t v) { sol_memcpy_(p, &v, 4); }

/* ---- checks ------------------------------------------------------------------------------ */

/* Each account of an instruction in its own role: a key passed twice is refused (an
 * account that is both config and anchor would be written twice). */
static uint64_t distinct_accounts(const SolParameters *params, uint64_t count) {
  for (uint64_t i = 0; i < count; i++) {
    if (params->dup_of[i] != i) return ERR_DUPLICATE_ACCOUNT;
  }
  return 0;
}

/* The PDA of ``seeds`` + its canonical bump must be ``account``'s key. */
static uint64_t expect_pda(const SolAccountInfo *account, const SolSignerSeed *seeds,
                           int seed_count, const SolPubkey *program_id, uint8_t *bump) {
  SolPubkey derived;
  if (sol_try_find_program_address(seeds, seed_count, program_id, &derived, bump) != 0)
    return ERR_INVALID_ACCOUNT;
  return sol_pubkey_eq(&derived, account->key) ? 0 : ERR_INVALID_ACCOUNT;
}

/* An initialised account of this program with the given discriminator and size. */
static uint64_t expect_owned(const SolAccountInfo *account, const SolPubkey *program_id,
                             const uint8_t *discriminator, uint64_t size) {
  if (!sol_pubkey_eq(account->owner, program_id)) return ERR_INVALID_ACCOUNT;
  if (account->data_len != size) return ERR_INVALID_ACCOUNT;
  return sol_bytes_eq(account->data, discriminator, 8) ? 0 : ERR_INVALID_ACCOUNT;
}

/* ---- creating a PDA account -------------------------------------------------------------- */

typedef struct {
  SolAccountInfo *payer;
  SolAccountInfo *account;
  SolAccountInfo *system_program;
  const SolSignerSeeds *signer;
  const SolPubkey *owner;
  uint64_t space;
} Creation;

static uint64_t system_call(const Creation *c, const uint8_t *data, uint64_t len,
                            bool from_payer) {
  SolAccountMeta metas[2] = {{c->payer->key, true, true}, {c->account->key, true, true}};
  SolAccountMeta *first = from_payer ? metas : metas + 1;
  SolInstruction ix = {(SolPubkey *)&SYSTEM_PROGRAM, first, from_payer ? 2 : 1,
                       (uint8_t *)data, len};
  SolAccountInfo infos[3] = {*c->payer, *c->account, *c->system_program};
  uint64_t result = sol_invoke_signed_c(&ix, infos, 3, c->signer, 1);
  /* the callee may have resized the account: the runtime wrote its new length just
   * before its data in the input buffer, which our copy must follow */
  c->account->data_len = *(const uint64_t *)(c->account->data - 8);
  return result;
}

/* Rent-exempt minimum: (128 + space) bytes × lamports per byte-year × the exemption
 * threshold. SBPF has no floating point: the threshold (an f64: 2.0 on older clusters,
 * 1.0 where the byte-year price doubled instead) is read from its bits as a power of two,
 * and any other value is rounded up to the next one (funding a little more, never too
 * little: an account short of rent exemption is refused by the runtime). */
static uint64_t rent_minimum(uint64_t space) {
  uint64_t rent[3]; /* Rent: lamports per byte-year, threshold (f64), burn (u8), padded */
  sol_get_rent_sysvar(rent);
  uint64_t bits = rent[1];
  int64_t exponent = (int64_t)((bits >> 52) & 0x7FF) - 1023;
  bool exact = (bits & 0xFFFFFFFFFFFFFUL) == 0;
  if (exponent < 0) exponent = 0; /* below 1: count it as 1 */
  if (!exact) exponent += 1;
  if (exponent > 8) exponent = 8; /* a threshold of 256 years would be absurd */
  return (128 + space) * rent[0] * (1UL << exponent);
}

/* Create ``account`` (a PDA signed by ``signer``) owned by this program. An account
 * someone funded beforehand is topped up, allocated and assigned instead, so sending it
 * lamports cannot block its creation. */
static uint64_t create_pda(const Creation *c) {
  uint64_t needed = rent_minimum(c->space);
  uint8_t data[52];
  if (!sol_pubkey_eq(c->account->owner, &SYSTEM_PROGRAM) || c->account->data_len != 0)
    return ERR_ALREADY_EXISTS;
  uint64_t result;
  if (*c->account->lamports == 0) {
    sol_memset_(data, 0, 4); /* CreateAccount */
    put_u64(data + 4, needed);
    put_u64(data + 12, c->space);
    sol_memcpy_(data + 20, c->owner, 32);
    return system_call(c, data, 52, true);
  }
  if (*c->account->lamports < needed) {
    sol_memset_(data, 0, 4);
    data[0] = 2; /* Transfer */
    put_u64(data + 4, needed - *c->account->lamports);
    result = system_call(c, data, 12, true);
    if (result) return result;
  }
  sol_memset_(data, 0, 4);
  data[0] = 8; /* Allocate */
  put_u64(data + 4, c->space);
  result = system_call(c, data, 12, false);
  if (result) return result;
  sol_memset_(data, 0, 4);
  data[0] = 1; /* Assign */
  sol_memcpy_(data + 4, c->owner, 32);
  return system_call(c, data, 36, false);
}

/* ---- initialize ------------------------------------------------------------------------ */

/* Whoever deployed the program (its upgrade authority, named in its ProgramData account)
 * is the only one who may initialise it: nobody can front-run the deployer. */
static uint64_t expect_upgrade_authority(const SolAccountInfo *programdata,
                                         const SolAccountInfo *signer,
                                         const SolPubkey *program_id) {
  SolPubkey derived;
  uint8_t bump;
  SolSignerSeed seeds[1] = {{program_id->x, 32}};
  if (sol_try_find_program_address(seeds, 1, &UPGRADEABLE_LOADER, &derived, &bump) != 0 ||
      !sol_pubkey_eq(&derived, programdata->key) ||
      !sol_pubkey_eq(programdata->owner, &UPGRADEABLE_LOADER) || programdata->data_len < 45)
    return ERR_INVALID_ACCOUNT;
  const uint8_t *d = programdata->data;
  if (get_u32(d) != 3 || d[12] != 1 || !sol_bytes_eq(d + 13, signer->key->x, 32))
    return ERR_UNAUTHORIZED;
  return 0;
}

#define ERR_UPGRADEABLE 6013

/* The program's ProgramData says nobody can upgrade it any more: funds enter only then
 * (an upgrade could otherwise replace every rule here, the vaults' included). */
static uint64_t expect_immutable(const SolAccountInfo *programdata,
                                 const SolPubkey *program_id) {
  SolPubkey derived;
  uint8_t bump;
  SolSignerSeed seeds[1] = {{program_id->x, 32}};
  if (sol_try_find_program_address(seeds, 1, &UPGRADEABLE_LOADER, &derived, &bump) != 0 ||
      !sol_pubkey_eq(&derived, programdata->key) ||
      !sol_pubkey_eq(programdata->owner, &UPGRADEABLE_LOADER) || programdata->data_len < 13 ||
      get_u32(programdata->data) != 3)
    return ERR_INVALID_ACCOUNT;
  return programdata->data[12] == 0 ? 0 : ERR_UPGRADEABLE;
}

/* accounts: config (w), authority (signer, w), mint, treasury, system program, the
 * program's ProgramData (its upgrade authority must be the signer)
 * data: fee_bps u16, quorum u8, verifiers vec<pubkey>, min_stake u64,
 *       unbonding_period i64, max_slash_per_receipt u64, challenge_period i64 */
static uint64_t initialize(SolParameters *params) {
  if (params->ka_num != 6) return ERR_INVALID_ACCOUNT;
  uint64_t result = distinct_accounts(params, 6);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *authority = &params->ka[1];
  SolAccountInfo *mint = &params->ka[2], *treasury = &params->ka[3];
  SolAccountInfo *system = &params->ka[4], *programdata = &params->ka[5];
  if (!authority->is_signer || !authority->is_writable || !config->is_writable)
    return ERR_UNAUTHORIZED;
  result = expect_upgrade_authority(programdata, authority, params->program_id);
  if (result) return result;
  if (!sol_pubkey_eq(system->key, &SYSTEM_PROGRAM)) return ERR_INVALID_ACCOUNT;
  /* the mint and the treasury are SPL Token accounts, not look-alikes */
  /* no freeze authority: nobody may lock a vault of this mint */
  if (!sol_pubkey_eq(mint->owner, &TOKEN_PROGRAM) || mint->data_len != 82 ||
      get_u32(mint->data + 46) != 0)
    return ERR_INVALID_ACCOUNT;
  if (!sol_pubkey_eq(treasury->owner, &TOKEN_PROGRAM) || treasury->data_len != 165 ||
      !sol_bytes_eq(treasury->data, mint->key->x, 32))
    return ERR_INVALID_ACCOUNT;

  const uint8_t *in = params->data + 8;
  uint64_t left = params->data_len - 8;
  if (left < 2 + 1 + 4) return ERR_INVALID_ARGUMENT;
  uint16_t fee_bps = get_u16(in);
  uint8_t quorum = in[2];
  uint32_t count = (uint32_t)(in[3] | (in[4] << 8) | (in[5] << 16) | ((uint32_t)in[6] << 24));
  if (count == 0 || count > MAX_VERIFIERS) return ERR_INVALID_ARGUMENT;
  if (left != 7 + 32 * (uint64_t)count + 32) return ERR_INVALID_ARGUMENT;
  const uint8_t *verifiers = in + 7;
  const uint8_t *tail = verifiers + 32 * (uint64_t)count;
  int64_t unbonding = (int64_t)get_u64(tail + 8);
  int64_t challenge = (int64_t)get_u64(tail + 24);
  if (fee_bps > MAX_FEE_BPS || quorum == 0 || quorum > count || quorum > MAX_QUORUM ||
      unbonding < 0 || unbonding > MAX_UNBONDING_PERIOD || challenge <= 0 ||
      challenge > MAX_CHALLENGE_PERIOD)
    return ERR_INVALID_ARGUMENT;
  for (uint32_t i = 0; i < count; i++) { /* m of n means n distinct keys */
    for (uint32_t j = i + 1; j < count; j++) {
      if (sol_bytes_eq(verifiers + 32 * i, verifiers + 32 * j, 32)) return ERR_INVALID_ARGUMENT;
    }
  }

  uint8_t bump;
  SolSignerSeed find[1] = {{SEED_CONFIG, sizeof(SEED_CONFIG) - 1}};
  result = expect_pda(config, find, 1, params->program_id, &bump);
  if (result) return result;
  SolSignerSeed seeds[2] = {{SEED_CONFIG, sizeof(SEED_CONFIG) - 1}, {&bump, 1}};
  SolSignerSeeds signer = {seeds, 2};
  Creation creation = {authority, config, system, &signer, params->program_id, CONFIG_SIZE};
  result = create_pda(&creation);
  if (result) return result;

  uint8_t *d = config->data;
  sol_memcpy_(d, DISC_ACCOUNT_MARKET_CONFIG, 8);
  sol_memcpy_(d + CFG_AUTHORITY, authority->key, 32);
  sol_memcpy_(d + CFG_MINT, mint->key, 32);
  sol_memcpy_(d + CFG_TREASURY, treasury->key, 32);
  d[CFG_FEE_BPS] = (uint8_t)fee_bps;
  d[CFG_FEE_BPS + 1] = (uint8_t)(fee_bps >> 8);
  d[CFG_QUORUM] = quorum;
  d[CFG_VERIFIER_COUNT] = (uint8_t)count;
  sol_memcpy_(d + CFG_VERIFIERS, verifiers, 32 * (uint64_t)count);
  /* min_stake, unbonding_period, max_slash, challenge_period */
  sol_memcpy_(d + CFG_MIN_STAKE, tail, 32);
  d[CFG_BUMP] = bump;
  return 0;
}

/* ---- anchor_root ------------------------------------------------------------------------- */

/* accounts: config, authority (signer, w), anchor (w), system program
 * data: root [u8; 32], leaf_count u64 */
static uint64_t anchor_root(SolParameters *params) {
  if (params->ka_num != 4) return ERR_INVALID_ACCOUNT;
  uint64_t result = distinct_accounts(params, 4);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *authority = &params->ka[1];
  SolAccountInfo *anchor = &params->ka[2], *system = &params->ka[3];
  if (params->data_len != 8 + 32 + 8) return ERR_INVALID_ARGUMENT;
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  if (!authority->is_signer || !authority->is_writable || !anchor->is_writable ||
      !sol_bytes_eq(config->data + CFG_AUTHORITY, authority->key->x, 32))
    return ERR_UNAUTHORIZED;
  if (!sol_pubkey_eq(system->key, &SYSTEM_PROGRAM)) return ERR_INVALID_ACCOUNT;
  const uint8_t *root = params->data + 8;
  uint64_t leaf_count = get_u64(root + 32);
  if (leaf_count == 0) return ERR_INVALID_ARGUMENT;

  uint8_t bump;
  SolSignerSeed find[2] = {{SEED_ANCHOR, sizeof(SEED_ANCHOR) - 1}, {root, 32}};
  result = expect_pda(anchor, find, 2, params->program_id, &bump);
  if (result) return result;
  SolSignerSeed seeds[3] = {{SEED_ANCHOR, sizeof(SEED_ANCHOR) - 1}, {root, 32}, {&bump, 1}};
  SolSignerSeeds signer = {seeds, 3};
  Creation creation = {authority, anchor, system, &signer, params->program_id, ANCHOR_SIZE};
  result = create_pda(&creation); /* a root is anchored once: the PDA exists after */
  if (result) return result;

  SolClock clock;
  sol_get_clock_sysvar(&clock);
  uint8_t *d = anchor->data;
  sol_memcpy_(d, DISC_ACCOUNT_RECEIPT_ANCHOR, 8);
  sol_memcpy_(d + ANC_ROOT, root, 32);
  put_u64(d + ANC_LEAF_COUNT, leaf_count);
  put_u64(d + ANC_SLOT, clock.slot);
  d[ANC_BUMP] = bump;
  return 0;
}

/* ---- stake ------------------------------------------------------------------------------- */

#define ERR_OVERFLOW 6006
#define ERR_NOT_YET 6007
#define ERR_INSUFFICIENT 6008

static void put_i64(uint8_t *p, int64_t v) { sol_memcpy_(p, &v, 8); }
static int64_t now(void) {
  SolClock clock;
  sol_get_clock_sysvar(&clock);
  return clock.unix_timestamp;
}

/* An SPL Token account of ``mint`` (data: mint, owner, amount, …). */
static bool is_token_account_of(const SolAccountInfo *account, const uint8_t *mint) {
  return sol_pubkey_eq(account->owner, &TOKEN_PROGRAM) &&
         account->data_len == TOKEN_ACCOUNT_SIZE && sol_bytes_eq(account->data, mint, 32);
}

typedef struct {
  SolAccountInfo *source;
  SolAccountInfo *destination;
  SolAccountInfo *authority;
  SolAccountInfo *token_program;
  uint64_t amount;
  const SolSignerSeeds *signer; /* the program signs for a PDA authority (a vault) */
} Transfer;

/* A token Transfer (instruction 3) of ``amount`` from ``source`` by ``authority``. */
static uint64_t token_transfer(const Transfer *t) {
  uint8_t data[9];
  data[0] = 3;
  put_u64(data + 1, t->amount);
  SolAccountMeta metas[3] = {{t->source->key, true, false},
                             {t->destination->key, true, false},
                             {t->authority->key, false, true}};
  SolInstruction ix = {(SolPubkey *)&TOKEN_PROGRAM, metas, 3, data, 9};
  SolAccountInfo infos[4] = {*t->source, *t->destination, *t->authority, *t->token_program};
  return sol_invoke_signed_c(&ix, infos, 4, t->signer, t->signer ? 1 : 0);
}

/* Create ``c->account`` as an SPL Token account of ``mint`` at its PDA (``c->signer``),
 * whose authority is ``authority``: a vault only this program signs for. */
static uint64_t create_token_vault(const Creation *c, SolAccountInfo *mint,
                                   SolAccountInfo *token_program, const SolPubkey *authority) {
  uint64_t result = create_pda(c);
  if (result) return result;
  uint8_t data[33];
  data[0] = 18; /* InitializeAccount3 */
  sol_memcpy_(data + 1, authority, 32);
  SolAccountMeta metas[2] = {{c->account->key, true, false}, {mint->key, false, false}};
  SolInstruction ix = {(SolPubkey *)&TOKEN_PROGRAM, metas, 2, data, 33};
  SolAccountInfo infos[3] = {*c->account, *mint, *token_program};
  return sol_invoke_signed_c(&ix, infos, 3, NULL, 0);
}

/* The operator's stake account, checked: this program's, a NodeStake, at its PDA, of
 * this operator. */
static uint64_t expect_stake(const SolAccountInfo *stake, const SolAccountInfo *operator,
                             const SolPubkey *program_id) {
  uint64_t result = expect_owned(stake, program_id, DISC_ACCOUNT_NODE_STAKE, STAKE_SIZE);
  if (result) return result;
  if (!sol_bytes_eq(stake->data + STK_OPERATOR, operator->key->x, 32)) return ERR_UNAUTHORIZED;
  SolPubkey derived;
  SolSignerSeed seeds[3] = {{SEED_STAKE, sizeof(SEED_STAKE) - 1}, {operator->key->x, 32},
                            {stake->data + STK_BUMP, 1}};
  if (sol_create_program_address(seeds, 3, program_id, &derived) != 0 ||
      !sol_pubkey_eq(&derived, stake->key))
    return ERR_INVALID_ACCOUNT;
  return 0;
}

/* accounts: config, operator (signer, w), stake (w), vault (w), mint, token program,
 * system program, the program's ProgramData. Creates the operator's NodeStake and its
 * vault token account, once the program can no longer be upgraded. */
static uint64_t register_stake(SolParameters *params) {
  if (params->ka_num != 8) return ERR_INVALID_ACCOUNT;
  uint64_t result = distinct_accounts(params, 8);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *operator = &params->ka[1];
  SolAccountInfo *stake = &params->ka[2], *vault = &params->ka[3], *mint = &params->ka[4];
  SolAccountInfo *token_program = &params->ka[5], *system = &params->ka[6];
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  result = expect_immutable(&params->ka[7], params->program_id);
  if (result) return result;
  if (!operator->is_signer || !operator->is_writable) return ERR_UNAUTHORIZED;
  if (!sol_pubkey_eq(system->key, &SYSTEM_PROGRAM) ||
      !sol_pubkey_eq(token_program->key, &TOKEN_PROGRAM) ||
      !sol_bytes_eq(config->data + CFG_MINT, mint->key->x, 32))
    return ERR_INVALID_ACCOUNT;
  uint8_t bump, vault_bump;
  SolSignerSeed find[2] = {{SEED_STAKE, sizeof(SEED_STAKE) - 1}, {operator->key->x, 32}};
  result = expect_pda(stake, find, 2, params->program_id, &bump);
  if (result) return result;
  SolSignerSeed find_vault[2] = {{SEED_VAULT, sizeof(SEED_VAULT) - 1}, {operator->key->x, 32}};
  result = expect_pda(vault, find_vault, 2, params->program_id, &vault_bump);
  if (result) return result;

  SolSignerSeed seeds[3] = {{SEED_STAKE, sizeof(SEED_STAKE) - 1}, {operator->key->x, 32},
                            {&bump, 1}};
  SolSignerSeeds signer = {seeds, 3};
  Creation creation = {operator, stake, system, &signer, params->program_id, STAKE_SIZE};
  result = create_pda(&creation);
  if (result) return result;
  SolSignerSeed vault_seeds[3] = {{SEED_VAULT, sizeof(SEED_VAULT) - 1},
                                  {operator->key->x, 32}, {&vault_bump, 1}};
  SolSignerSeeds vault_signer = {vault_seeds, 3};
  Creation vault_creation = {operator, vault, system, &vault_signer, &TOKEN_PROGRAM,
                             TOKEN_ACCOUNT_SIZE};
  result = create_token_vault(&vault_creation, mint, token_program, stake->key);
  if (result) return result;

  uint8_t *d = stake->data;
  sol_memcpy_(d, DISC_ACCOUNT_NODE_STAKE, 8);
  sol_memcpy_(d + STK_OPERATOR, operator->key, 32);
  sol_memcpy_(d + STK_VAULT, vault->key, 32);
  d[STK_BUMP] = bump;
  d[STK_VAULT_BUMP] = vault_bump;
  return 0;
}

/* accounts: operator (signer), stake (w), vault (w), source token account (w), token
 * program. data: amount u64. The operator's tokens into its vault. */
static uint64_t stake_tokens(SolParameters *params) {
  if (params->ka_num != 5 || params->data_len != 16) return ERR_INVALID_ARGUMENT;
  uint64_t result = distinct_accounts(params, 5);
  if (result) return result;
  SolAccountInfo *operator = &params->ka[0], *stake = &params->ka[1], *vault = &params->ka[2];
  SolAccountInfo *source = &params->ka[3], *token_program = &params->ka[4];
  if (!operator->is_signer) return ERR_UNAUTHORIZED;
  result = expect_stake(stake, operator, params->program_id);
  if (result) return result;
  if (!stake->is_writable || !sol_bytes_eq(stake->data + STK_VAULT, vault->key->x, 32) ||
      !sol_pubkey_eq(token_program->key, &TOKEN_PROGRAM))
    return ERR_INVALID_ACCOUNT;
  uint64_t amount = get_u64(params->data + 8);
  uint64_t staked = get_u64(stake->data + STK_STAKED);
  if (amount == 0) return ERR_INVALID_ARGUMENT;
  if (staked + amount < staked) return ERR_OVERFLOW;
  Transfer t = {source, vault, operator, token_program, amount, NULL};
  result = token_transfer(&t);
  if (result) return result;
  put_u64(stake->data + STK_STAKED, staked + amount);
  return 0;
}

/* accounts: operator (signer), stake (w). data: amount u64. Starts (or restarts, for
 * the new total) the unbonding period of that much of the stake. */
static uint64_t request_unbond(SolParameters *params) {
  if (params->ka_num != 2 || params->data_len != 16) return ERR_INVALID_ARGUMENT;
  uint64_t result = distinct_accounts(params, 2);
  if (result) return result;
  SolAccountInfo *operator = &params->ka[0], *stake = &params->ka[1];
  if (!operator->is_signer) return ERR_UNAUTHORIZED;
  result = expect_stake(stake, operator, params->program_id);
  if (result) return result;
  if (!stake->is_writable) return ERR_INVALID_ACCOUNT;
  uint64_t amount = get_u64(params->data + 8);
  uint64_t staked = get_u64(stake->data + STK_STAKED);
  uint64_t unbonding = get_u64(stake->data + STK_UNBONDING);
  if (amount == 0) return ERR_INVALID_ARGUMENT;
  if (unbonding + amount < unbonding || unbonding + amount > staked) return ERR_INSUFFICIENT;
  put_u64(stake->data + STK_UNBONDING, unbonding + amount);
  put_i64(stake->data + STK_UNBOND_AT, now());
  return 0;
}

/* accounts: config, operator (signer), stake (w), vault (w), destination token account
 * (w), token program. The unbonded tokens to the operator's account, once the period
 * has passed and no challenge is open: the operator's alone to ask, nobody's to stop
 * beyond those rules. */
static uint64_t withdraw(SolParameters *params) {
  if (params->ka_num != 6 || params->data_len != 8) return ERR_INVALID_ARGUMENT;
  uint64_t result = distinct_accounts(params, 6);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *operator = &params->ka[1];
  SolAccountInfo *stake = &params->ka[2], *vault = &params->ka[3];
  SolAccountInfo *destination = &params->ka[4], *token_program = &params->ka[5];
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  if (!operator->is_signer) return ERR_UNAUTHORIZED;
  result = expect_stake(stake, operator, params->program_id);
  if (result) return result;
  if (!stake->is_writable || !sol_bytes_eq(stake->data + STK_VAULT, vault->key->x, 32) ||
      !sol_pubkey_eq(token_program->key, &TOKEN_PROGRAM) ||
      !is_token_account_of(destination, config->data + CFG_MINT))
    return ERR_INVALID_ACCOUNT;
  uint64_t unbonding = get_u64(stake->data + STK_UNBONDING);
  if (unbonding == 0) return ERR_INSUFFICIENT;
  int64_t period = (int64_t)get_u64(config->data + CFG_UNBONDING);
  int64_t since = (int64_t)get_u64(stake->data + STK_UNBOND_AT);
  int64_t time = now();
  if (time < since + period) return ERR_NOT_YET;
  /* an open case holds the stake until it is decided or its period ends, and all cases
   * together for at most one challenge period past the unbonding period (no authority
   * can hold it for ever by opening case after case) */
  int64_t hold = (int64_t)get_u64(stake->data + STK_CHALLENGE_UNTIL);
  int64_t cap = since + period + (int64_t)get_u64(config->data + CFG_CHALLENGE_PERIOD);
  if (get_u32(stake->data + STK_OPEN_CASES) > 0 && time < (hold < cap ? hold : cap))
    return ERR_NOT_YET;
  SolSignerSeed seeds[3] = {{SEED_STAKE, sizeof(SEED_STAKE) - 1}, {operator->key->x, 32},
                            {stake->data + STK_BUMP, 1}};
  SolSignerSeeds signer = {seeds, 3};
  Transfer t = {vault, destination, stake, token_program, unbonding, &signer};
  result = token_transfer(&t);
  if (result) return result;
  put_u64(stake->data + STK_STAKED, get_u64(stake->data + STK_STAKED) - unbonding);
  put_u64(stake->data + STK_UNBONDING, 0);
  return 0;
}

/* ---- evidence: signatures the Ed25519 precompile checked in this transaction ----------- */

#define ERR_NO_EVIDENCE 6009
#define ERR_EXPIRED 6010
#define ERR_CASE_CLOSED 6011
#define MAX_SIGNED 16
#define MAX_PROOF_DEPTH 19 /* 524,288 receipts an anchor: the proof and its signature fit one transaction */

/* Sysvar1nstructions1111111111111111111111111 */
static const SolPubkey INSTRUCTIONS_SYSVAR = {{
    6, 167, 213, 23, 24, 123, 209, 102, 53, 218, 212, 4, 85, 253, 194, 192,
    193, 36, 198, 143, 33, 86, 117, 165, 219, 186, 203, 95, 8, 0, 0, 0}};
/* Ed25519SigVerify111111111111111111111111111 */
static const SolPubkey ED25519_PROGRAM = {{
    3, 125, 70, 214, 124, 147, 251, 190, 18, 249, 66, 143, 131, 141, 64, 255,
    5, 112, 116, 73, 39, 244, 138, 100, 252, 202, 112, 68, 128, 0, 0, 0}};
static const uint8_t RECEIPT_DOMAIN[16] = "AIDP/receipt/v1";  /* + NUL: protocol/keys.py */
static const uint8_t VERDICT_DOMAIN[16] = "AIDP/verdict/v1";
#define VERDICT_SIZE (16 + 32 + 32 + 32 + 8 + 8 + 32 + 8)
static const uint8_t ACQUIT_DOMAIN[16] = "AIDP/acquit/v1\0";
#define ACQUIT_SIZE (16 + 32 + 32 + 32 + 8)

typedef struct { const uint8_t *pubkey; const uint8_t *message; uint64_t size; } Signed;
typedef struct { Signed items[MAX_SIGNED]; uint64_t count; } SignedSet;

/* Every (key, message) an Ed25519 precompile instruction of this transaction verified,
 * read from the Instructions sysvar. Only entries whose key and message lie in the
 * precompile instruction's own data are taken (their bytes are what was verified). */
static uint64_t collect_signed(const SolAccountInfo *sysvar, SignedSet *out) {
  out->count = 0;
  if (!sol_pubkey_eq(sysvar->key, &INSTRUCTIONS_SYSVAR)) return ERR_INVALID_ACCOUNT;
  const uint8_t *d = sysvar->data;
  uint64_t len = sysvar->data_len;
  if (len < 4) return ERR_NO_EVIDENCE;
  uint16_t total = get_u16(d), current = get_u16(d + len - 2);
  if (2 + 2 * (uint64_t)total > len) return ERR_NO_EVIDENCE;
  for (uint16_t i = 0; i < total; i++) {
    if (i == current) continue;
    uint64_t at = get_u16(d + 2 + 2 * (uint64_t)i);
    if (at + 2 > len) return ERR_NO_EVIDENCE;
    at += 2 + 33 * (uint64_t)get_u16(d + at); /* account metas */
    if (at + 34 > len) return ERR_NO_EVIDENCE;
    bool precompile = sol_bytes_eq(d + at, ED25519_PROGRAM.x, 32);
    uint64_t size = get_u16(d + at + 32);
    const uint8_t *ix = d + at + 34;
    if (at + 34 + size > len) return ERR_NO_EVIDENCE;
    if (!precompile || size < 2) continue;
    uint8_t signatures = ix[0];
    for (uint8_t j = 0; j < signatures; j++) {
      const uint8_t *o = ix + 2 + 14 * (uint64_t)j;
      if (2 + 14 * ((uint64_t)j + 1) > size) return ERR_NO_EVIDENCE;
      uint16_t pk = get_u16(o + 4), msg = get_u16(o + 8), msg_size = get_u16(o + 10);
      if (get_u16(o + 2) != 0xFFFF || get_u16(o + 6) != 0xFFFF || get_u16(o + 12) != 0xFFFF)
        continue; /* data in another instruction: not read here */
      if ((uint64_t)pk + 32 > size || (uint64_t)msg + msg_size > size) continue;
      if (out->count == MAX_SIGNED) return ERR_NO_EVIDENCE;
      Signed *item = &out->items[out->count++];
      item->pubkey = ix + pk;
      item->message = ix + msg;
      item->size = msg_size;
    }
  }
  return 0;
}

static bool was_signed(const SignedSet *set, const uint8_t *pubkey, const uint8_t *message,
                       uint64_t size) {
  for (uint64_t i = 0; i < set->count; i++) {
    const Signed *item = &set->items[i];
    if (item->size == size && sol_bytes_eq(item->pubkey, pubkey, 32) &&
        sol_bytes_eq(item->message, message, size))
      return true;
  }
  return false;
}

typedef struct {
  const uint8_t *leaf; /* the leaf's bytes (a receipt hash; a payout's index, node, amount) */
  uint64_t leaf_len;
  const uint8_t *proof; /* depth sibling hashes, 32 bytes each */
  uint32_t depth;
  uint32_t lefts; /* bit i: the i-th sibling is on the left */
} Inclusion;

/* RFC 6962 inclusion (protocol/merkle.py): leaf sha256(0x00 || leaf), node sha256(0x01 ||
 * left || right). */
static void merkle_root_of(const Inclusion *in, uint8_t *root) {
  const uint8_t *proof = in->proof;
  uint32_t depth = in->depth, lefts = in->lefts;
  uint8_t prefix[1] = {0};
  SolBytes leaf[2] = {{prefix, 1}, {in->leaf, in->leaf_len}};
  sol_sha256(leaf, 2, root);
  prefix[0] = 1;
  for (uint32_t i = 0; i < depth; i++) {
    uint8_t node[32];
    sol_memcpy_(node, root, 32);
    const uint8_t *sibling = proof + 32 * (uint64_t)i;
    bool left = (lefts >> i) & 1;
    SolBytes parts[3] = {{prefix, 1}, {left ? sibling : node, 32}, {left ? node : sibling, 32}};
    sol_sha256(parts, 3, root);
  }
}

/* A quorum of the config's verifiers, each counted once, signed ``message`` in this
 * transaction. */
static uint64_t expect_quorum(const SolAccountInfo *config, const SolAccountInfo *sysvar,
                              const uint8_t *message, uint64_t size) {
  SignedSet signed_set;
  uint64_t result = collect_signed(sysvar, &signed_set);
  if (result) return result;
  uint8_t count = config->data[CFG_VERIFIER_COUNT], agreeing = 0;
  for (uint8_t v = 0; v < count; v++) {
    if (was_signed(&signed_set, config->data + CFG_VERIFIERS + 32 * (uint64_t)v, message,
                   size))
      agreeing++;
  }
  return agreeing < config->data[CFG_QUORUM] ? ERR_NO_EVIDENCE : 0;
}

/* SlashCase: PDA ["case", receipt_hash], one per receipt ever */
#define CASE_RECEIPT 8
#define CASE_OPERATOR 40
#define CASE_ROOT 72
#define CASE_OPENED_AT 104
#define CASE_STATE 112 /* 0 open, 1 slashed, 2 closed */
#define CASE_AMOUNT 113
#define CASE_BUMP 121
#define CASE_SIZE 122
static const uint8_t SEED_CASE[] = "case";

/* accounts: config, authority (signer, w), anchor, stake (w), case (w), instructions
 * sysvar, system program. data: receipt_hash [32], lefts u32, proof vec<[u8; 32]>.
 * Opens a case against the node for one receipt it signed that an anchored root holds;
 * the node's stake stays until the case is decided or its period ends. */
static uint64_t open_case(SolParameters *params) {
  if (params->ka_num != 7) return ERR_INVALID_ACCOUNT;
  uint64_t result = distinct_accounts(params, 7);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *authority = &params->ka[1];
  SolAccountInfo *anchor = &params->ka[2], *stake = &params->ka[3], *cs = &params->ka[4];
  SolAccountInfo *sysvar = &params->ka[5], *system = &params->ka[6];
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  if (!authority->is_signer || !authority->is_writable ||
      !sol_bytes_eq(config->data + CFG_AUTHORITY, authority->key->x, 32))
    return ERR_UNAUTHORIZED;
  result = expect_owned(anchor, params->program_id, DISC_ACCOUNT_RECEIPT_ANCHOR, ANCHOR_SIZE);
  if (result) return result;
  result = expect_owned(stake, params->program_id, DISC_ACCOUNT_NODE_STAKE, STAKE_SIZE);
  if (result) return result;
  if (!stake->is_writable || !sol_pubkey_eq(system->key, &SYSTEM_PROGRAM))
    return ERR_INVALID_ACCOUNT;
  if (params->data_len < 8 + 32 + 4 + 4) return ERR_INVALID_ARGUMENT;
  const uint8_t *hash = params->data + 8;
  uint32_t lefts = get_u32(hash + 32), depth = get_u32(hash + 36);
  if (depth > MAX_PROOF_DEPTH || params->data_len != 8 + 32 + 8 + 32 * (uint64_t)depth)
    return ERR_INVALID_ARGUMENT;
  uint8_t root[32];
  Inclusion inclusion = {hash, 32, hash + 40, depth, lefts};
  merkle_root_of(&inclusion, root);
  if (!sol_bytes_eq(root, anchor->data + ANC_ROOT, 32)) return ERR_NO_EVIDENCE;
  /* the node signed this receipt (its stake account names its key) */
  SignedSet signed_set;
  result = collect_signed(sysvar, &signed_set);
  if (result) return result;
  uint8_t message[48];
  sol_memcpy_(message, RECEIPT_DOMAIN, 16);
  sol_memcpy_(message + 16, hash, 32);
  if (!was_signed(&signed_set, stake->data + STK_OPERATOR, message, 48)) return ERR_NO_EVIDENCE;

  uint8_t bump;
  SolSignerSeed find[2] = {{SEED_CASE, sizeof(SEED_CASE) - 1}, {hash, 32}};
  result = expect_pda(cs, find, 2, params->program_id, &bump);
  if (result) return result;
  SolSignerSeed seeds[3] = {{SEED_CASE, sizeof(SEED_CASE) - 1}, {hash, 32}, {&bump, 1}};
  SolSignerSeeds signer = {seeds, 3};
  Creation creation = {authority, cs, system, &signer, params->program_id, CASE_SIZE};
  result = create_pda(&creation);
  if (result) return result;
  int64_t time = now();
  uint8_t *c = cs->data;
  sol_memcpy_(c, DISC_ACCOUNT_SLASH_CASE, 8);
  sol_memcpy_(c + CASE_RECEIPT, hash, 32);
  sol_memcpy_(c + CASE_OPERATOR, stake->data + STK_OPERATOR, 32);
  sol_memcpy_(c + CASE_ROOT, root, 32);
  put_i64(c + CASE_OPENED_AT, time);
  c[CASE_BUMP] = bump;
  uint32_t open = get_u32(stake->data + STK_OPEN_CASES);
  put_u32(stake->data + STK_OPEN_CASES, open + 1);
  int64_t until = time + (int64_t)get_u64(config->data + CFG_CHALLENGE_PERIOD);
  if (until > (int64_t)get_u64(stake->data + STK_CHALLENGE_UNTIL))
    put_i64(stake->data + STK_CHALLENGE_UNTIL, until);
  return 0;
}

/* The case's stake account: the one of the case's operator, at its PDA. */
static uint64_t expect_case_stake(const SolAccountInfo *cs, const SolAccountInfo *stake,
                                  const SolPubkey *program_id) {
  uint64_t result = expect_owned(cs, program_id, DISC_ACCOUNT_SLASH_CASE, CASE_SIZE);
  if (result) return result;
  result = expect_owned(stake, program_id, DISC_ACCOUNT_NODE_STAKE, STAKE_SIZE);
  if (result) return result;
  if (!sol_bytes_eq(stake->data + STK_OPERATOR, cs->data + CASE_OPERATOR, 32))
    return ERR_INVALID_ACCOUNT;
  SolPubkey derived;
  SolSignerSeed seeds[3] = {{SEED_STAKE, sizeof(SEED_STAKE) - 1},
                            {cs->data + CASE_OPERATOR, 32}, {stake->data + STK_BUMP, 1}};
  if (sol_create_program_address(seeds, 3, program_id, &derived) != 0 ||
      !sol_pubkey_eq(&derived, stake->key))
    return ERR_INVALID_ACCOUNT;
  if (cs->data[CASE_STATE] != 0) return ERR_CASE_CLOSED;
  return 0;
}

static void close_open_case(SolAccountInfo *cs, SolAccountInfo *stake, uint8_t state) {
  cs->data[CASE_STATE] = state;
  uint32_t open = get_u32(stake->data + STK_OPEN_CASES);
  put_u32(stake->data + STK_OPEN_CASES, open ? open - 1 : 0);
}

/* accounts: config, case (w), stake (w), vault (w), refund (w), treasury (w),
 * instructions sysvar, token program. data: amount u64, refund u64, nonce u64.
 * Anyone may submit it: what moves the stake is a quorum of the config's verifiers
 * having signed (Ed25519 precompile, this transaction) the verdict naming the receipt,
 * the node, the amount, the refund and its account, and a nonce, within the case's
 * period. At most max_slash_per_receipt and the stake; the refund to the buyer's account,
 * the rest to the treasury; a case is decided once. */
static uint64_t slash(SolParameters *params) {
  if (params->ka_num != 8 || params->data_len != 8 + 24) return ERR_INVALID_ARGUMENT;
  uint64_t result = distinct_accounts(params, 8);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *cs = &params->ka[1], *stake = &params->ka[2];
  SolAccountInfo *vault = &params->ka[3], *refund = &params->ka[4];
  SolAccountInfo *treasury = &params->ka[5], *sysvar = &params->ka[6];
  SolAccountInfo *token_program = &params->ka[7];
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  result = expect_case_stake(cs, stake, params->program_id);
  if (result) return result;
  const uint8_t *mint = config->data + CFG_MINT;
  if (!cs->is_writable || !stake->is_writable ||
      !sol_bytes_eq(stake->data + STK_VAULT, vault->key->x, 32) ||
      !sol_bytes_eq(config->data + CFG_TREASURY, treasury->key->x, 32) ||
      !is_token_account_of(refund, mint) || !sol_pubkey_eq(token_program->key, &TOKEN_PROGRAM))
    return ERR_INVALID_ACCOUNT;
  uint64_t amount = get_u64(params->data + 8), to_refund = get_u64(params->data + 16);
  if (amount == 0 || to_refund > amount || amount > get_u64(config->data + CFG_MAX_SLASH))
    return ERR_INVALID_ARGUMENT;
  int64_t deadline = (int64_t)get_u64(cs->data + CASE_OPENED_AT) +
                     (int64_t)get_u64(config->data + CFG_CHALLENGE_PERIOD);
  if (now() >= deadline) return ERR_EXPIRED;

  /* the verdict names this program (a verdict for another deployment is not one here) */
  uint8_t verdict[VERDICT_SIZE];
  sol_memcpy_(verdict, VERDICT_DOMAIN, 16);
  sol_memcpy_(verdict + 16, params->program_id, 32);
  sol_memcpy_(verdict + 48, cs->data + CASE_RECEIPT, 32);
  sol_memcpy_(verdict + 80, cs->data + CASE_OPERATOR, 32);
  sol_memcpy_(verdict + 112, params->data + 8, 16); /* amount, refund */
  sol_memcpy_(verdict + 128, refund->key, 32);
  sol_memcpy_(verdict + 160, params->data + 24, 8); /* nonce */
  result = expect_quorum(config, sysvar, verdict, VERDICT_SIZE);
  if (result) return result;

  uint64_t staked = get_u64(stake->data + STK_STAKED);
  uint64_t taken = amount < staked ? amount : staked;
  uint64_t refunded = to_refund < taken ? to_refund : taken;
  SolSignerSeed seeds[3] = {{SEED_STAKE, sizeof(SEED_STAKE) - 1},
                            {cs->data + CASE_OPERATOR, 32}, {stake->data + STK_BUMP, 1}};
  SolSignerSeeds signer = {seeds, 3};
  if (refunded) {
    Transfer t = {vault, refund, stake, token_program, refunded, &signer};
    result = token_transfer(&t);
    if (result) return result;
  }
  if (taken > refunded) {
    Transfer t = {vault, treasury, stake, token_program, taken - refunded, &signer};
    result = token_transfer(&t);
    if (result) return result;
  }
  put_u64(stake->data + STK_STAKED, staked - taken);
  uint64_t unbonding = get_u64(stake->data + STK_UNBONDING);
  if (unbonding > staked - taken) put_u64(stake->data + STK_UNBONDING, staked - taken);
  put_u64(stake->data + STK_SLASHED, get_u64(stake->data + STK_SLASHED) + taken);
  put_u64(cs->data + CASE_AMOUNT, taken);
  close_open_case(cs, stake, 1);
  return 0;
}

/* accounts: config, case (w), stake (w), instructions sysvar. data: nonce u64.
 * Closes a case: before its period ends only on a quorum of verifiers' acquittal
 * (AIDP/acquit/v1 || program || receipt || node || nonce: the authority alone cannot
 * overturn a verdict by closing first); after it, anyone may (the case is moot). */
static uint64_t close_case(SolParameters *params) {
  if (params->ka_num != 4 || params->data_len != 16) return ERR_INVALID_ARGUMENT;
  uint64_t result = distinct_accounts(params, 4);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *cs = &params->ka[1], *stake = &params->ka[2];
  SolAccountInfo *sysvar = &params->ka[3];
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  result = expect_case_stake(cs, stake, params->program_id);
  if (result) return result;
  if (!cs->is_writable || !stake->is_writable) return ERR_INVALID_ACCOUNT;
  int64_t deadline = (int64_t)get_u64(cs->data + CASE_OPENED_AT) +
                     (int64_t)get_u64(config->data + CFG_CHALLENGE_PERIOD);
  if (now() < deadline) {
    uint8_t acquit[ACQUIT_SIZE];
    sol_memcpy_(acquit, ACQUIT_DOMAIN, 16);
    sol_memcpy_(acquit + 16, params->program_id, 32);
    sol_memcpy_(acquit + 48, cs->data + CASE_RECEIPT, 32);
    sol_memcpy_(acquit + 80, cs->data + CASE_OPERATOR, 32);
    sol_memcpy_(acquit + 112, params->data + 8, 8);
    result = expect_quorum(config, sysvar, acquit, ACQUIT_SIZE);
    if (result) return result;
  }
  close_open_case(cs, stake, 2);
  return 0;
}

/* ---- payouts ------------------------------------------------------------------------------ */

/* Payouts: PDA ["payout", epoch u64]: the epoch's Merkle root of (index u32, node, amount
 * u64) leaves, the total funded into its vault (PDA ["payout_vault", epoch], authority:
 * the Payouts account) and a bitmap of claimed leaves */
#define PAY_EPOCH 8
#define PAY_ROOT 16
#define PAY_TOTAL 48
#define PAY_CLAIMED 56
#define PAY_LEAVES 64
#define PAY_BUMP 68
#define PAY_VAULT_BUMP 69
#define PAY_BITMAP 70
#define MAX_PAYOUT_LEAVES 65536 /* an 8 KiB bitmap: under what one instruction may allocate */
#define ERR_CLAIMED 6012
static const uint8_t SEED_PAYOUT[] = "payout";
static const uint8_t SEED_PAYOUT_VAULT[] = "payout_vault";

/* accounts: config, authority (signer, w), payouts (w), payout vault (w), source (w,
 * the authority's token account), mint, token program, system program.
 * data: epoch u64, root [32], total u64, leaf_count u32. Funds the epoch's payouts:
 * from here on each node claims its own, with or without the market. */
static uint64_t post_payouts(SolParameters *params) {
  if (params->ka_num != 9 || params->data_len != 8 + 8 + 32 + 8 + 4) return ERR_INVALID_ARGUMENT;
  uint64_t result = distinct_accounts(params, 9);
  if (result) return result;
  result = expect_immutable(&params->ka[8], params->program_id);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *authority = &params->ka[1];
  SolAccountInfo *payouts = &params->ka[2], *vault = &params->ka[3], *source = &params->ka[4];
  SolAccountInfo *mint = &params->ka[5], *token_program = &params->ka[6];
  SolAccountInfo *system = &params->ka[7];
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  if (!authority->is_signer || !authority->is_writable ||
      !sol_bytes_eq(config->data + CFG_AUTHORITY, authority->key->x, 32))
    return ERR_UNAUTHORIZED;
  if (!sol_pubkey_eq(system->key, &SYSTEM_PROGRAM) ||
      !sol_pubkey_eq(token_program->key, &TOKEN_PROGRAM) ||
      !sol_bytes_eq(config->data + CFG_MINT, mint->key->x, 32))
    return ERR_INVALID_ACCOUNT;
  const uint8_t *epoch = params->data + 8;
  const uint8_t *root = epoch + 8;
  uint64_t total = get_u64(root + 32);
  uint32_t leaves = get_u32(root + 40);
  if (total == 0 || leaves == 0 || leaves > MAX_PAYOUT_LEAVES) return ERR_INVALID_ARGUMENT;

  uint8_t bump, vault_bump;
  SolSignerSeed find[2] = {{SEED_PAYOUT, sizeof(SEED_PAYOUT) - 1}, {epoch, 8}};
  result = expect_pda(payouts, find, 2, params->program_id, &bump);
  if (result) return result;
  SolSignerSeed find_vault[2] = {{SEED_PAYOUT_VAULT, sizeof(SEED_PAYOUT_VAULT) - 1},
                                 {epoch, 8}};
  result = expect_pda(vault, find_vault, 2, params->program_id, &vault_bump);
  if (result) return result;
  uint64_t size = PAY_BITMAP + ((uint64_t)leaves + 7) / 8;
  SolSignerSeed seeds[3] = {{SEED_PAYOUT, sizeof(SEED_PAYOUT) - 1}, {epoch, 8}, {&bump, 1}};
  SolSignerSeeds signer = {seeds, 3};
  Creation creation = {authority, payouts, system, &signer, params->program_id, size};
  result = create_pda(&creation); /* an epoch is posted once */
  if (result) return result;
  SolSignerSeed vault_seeds[3] = {{SEED_PAYOUT_VAULT, sizeof(SEED_PAYOUT_VAULT) - 1},
                                  {epoch, 8}, {&vault_bump, 1}};
  SolSignerSeeds vault_signer = {vault_seeds, 3};
  Creation vault_creation = {authority, vault, system, &vault_signer, &TOKEN_PROGRAM,
                             TOKEN_ACCOUNT_SIZE};
  result = create_token_vault(&vault_creation, mint, token_program, payouts->key);
  if (result) return result;
  Transfer t = {source, vault, authority, token_program, total, NULL};
  result = token_transfer(&t);
  if (result) return result;

  uint8_t *d = payouts->data;
  sol_memcpy_(d, DISC_ACCOUNT_PAYOUTS, 8);
  sol_memcpy_(d + PAY_EPOCH, epoch, 8);
  sol_memcpy_(d + PAY_ROOT, root, 32);
  put_u64(d + PAY_TOTAL, total);
  put_u32(d + PAY_LEAVES, leaves);
  d[PAY_BUMP] = bump;
  d[PAY_VAULT_BUMP] = vault_bump;
  return 0;
}

/* accounts: payouts (w), payout vault (w), destination (w: a token account of the
 * node's, of the mint), token program. data: index u32, node [32], amount u64,
 * lefts u32, ata_bump u8, proof vec<[u8; 32]>. Anyone may claim for a node: the leaf
 * names it and the
 * tokens go only to an account it owns; each leaf is paid once. */
static uint64_t claim(SolParameters *params) {
  if (params->ka_num != 4) return ERR_INVALID_ACCOUNT;
  uint64_t result = distinct_accounts(params, 4);
  if (result) return result;
  SolAccountInfo *payouts = &params->ka[0], *vault = &params->ka[1];
  SolAccountInfo *destination = &params->ka[2], *token_program = &params->ka[3];
  if (!sol_pubkey_eq(payouts->owner, params->program_id) || payouts->data_len < PAY_BITMAP ||
      !sol_bytes_eq(payouts->data, DISC_ACCOUNT_PAYOUTS, 8) || !payouts->is_writable)
    return ERR_INVALID_ACCOUNT;
  uint8_t *d = payouts->data;
  uint32_t leaves = get_u32(d + PAY_LEAVES);
  if (payouts->data_len != PAY_BITMAP + ((uint64_t)leaves + 7) / 8) return ERR_INVALID_ACCOUNT;
  SolPubkey derived;
  SolSignerSeed vault_seeds[3] = {{SEED_PAYOUT_VAULT, sizeof(SEED_PAYOUT_VAULT) - 1},
                                  {d + PAY_EPOCH, 8}, {d + PAY_VAULT_BUMP, 1}};
  if (sol_create_program_address(vault_seeds, 3, params->program_id, &derived) != 0 ||
      !sol_pubkey_eq(&derived, vault->key) || !sol_pubkey_eq(token_program->key, &TOKEN_PROGRAM))
    return ERR_INVALID_ACCOUNT;
  if (params->data_len < 8 + 4 + 32 + 8 + 4 + 1 + 4) return ERR_INVALID_ARGUMENT;
  const uint8_t *leaf = params->data + 8; /* index, node, amount: 44 bytes */
  uint32_t index = get_u32(leaf);
  const uint8_t *node = leaf + 4;
  uint64_t amount = get_u64(leaf + 36);
  uint32_t lefts = get_u32(leaf + 44);
  const uint8_t *ata_bump = leaf + 48;
  uint32_t depth = get_u32(leaf + 49);
  if (depth > 32 || params->data_len != 8 + 53 + 32 * (uint64_t)depth)
    return ERR_INVALID_ARGUMENT;
  if (index >= leaves || amount == 0) return ERR_INVALID_ARGUMENT;
  /* the destination is the node's associated token account of the vault's mint (the
   * account its wallet shows, not one someone else opened in its name). The caller names
   * the bump: one derivation at a fixed cost instead of a search whose cost depends on
   * the node's key; a non-canonical bump names an address the associated token program
   * never creates, so the transfer into it fails. */
  if (vault->data_len != TOKEN_ACCOUNT_SIZE) return ERR_INVALID_ACCOUNT;
  SolPubkey ata;
  SolSignerSeed ata_seeds[4] = {{node, 32}, {TOKEN_PROGRAM.x, 32}, {vault->data, 32},
                                {ata_bump, 1}};
  if (sol_create_program_address(ata_seeds, 4, &ASSOCIATED_TOKEN_PROGRAM, &ata) != 0 ||
      !sol_pubkey_eq(&ata, destination->key))
    return ERR_INVALID_ACCOUNT;
  uint8_t *bits = d + PAY_BITMAP + index / 8;
  uint8_t bit = (uint8_t)(1u << (index % 8));
  if (*bits & bit) return ERR_CLAIMED;

  /* the 44 leaf bytes, as protocol.merkle.hash_leaf takes their hex */
  uint8_t root[32];
  Inclusion inclusion = {leaf, 44, leaf + 53, depth, lefts};
  merkle_root_of(&inclusion, root);
  if (!sol_bytes_eq(root, d + PAY_ROOT, 32)) return ERR_NO_EVIDENCE;
  uint64_t claimed = get_u64(d + PAY_CLAIMED);
  if (claimed + amount < claimed || claimed + amount > get_u64(d + PAY_TOTAL))
    return ERR_INSUFFICIENT;

  SolSignerSeed seeds[3] = {{SEED_PAYOUT, sizeof(SEED_PAYOUT) - 1}, {d + PAY_EPOCH, 8},
                            {d + PAY_BUMP, 1}};
  SolSignerSeeds signer = {seeds, 3};
  Transfer t = {vault, destination, payouts, token_program, amount, &signer};
  result = token_transfer(&t);
  if (result) return result;
  *bits |= bit;
  put_u64(d + PAY_CLAIMED, claimed + amount);
  return 0;
}

/* accounts: config, authority (signer, w: receives the rent), payouts (w), payout vault
 * (w), token program. Closes an epoch once every leaf is claimed (claimed == total, the
 * vault empty): the vault by the token program's CloseAccount, signed for by the Payouts
 * PDA, then the Payouts account itself (its lamports to the authority, its data zeroed:
 * the runtime drops it at the end of the transaction, so nothing can revive it). A
 * partly claimed epoch stays open for as long as its nodes take: nobody's claim is lost. */
static uint64_t close_epoch(SolParameters *params) {
  if (params->ka_num != 5 || params->data_len != 8) return ERR_INVALID_ARGUMENT;
  uint64_t result = distinct_accounts(params, 5);
  if (result) return result;
  SolAccountInfo *config = &params->ka[0], *authority = &params->ka[1];
  SolAccountInfo *payouts = &params->ka[2], *vault = &params->ka[3];
  SolAccountInfo *token_program = &params->ka[4];
  result = expect_owned(config, params->program_id, DISC_ACCOUNT_MARKET_CONFIG, CONFIG_SIZE);
  if (result) return result;
  if (!authority->is_signer || !authority->is_writable ||
      !sol_bytes_eq(config->data + CFG_AUTHORITY, authority->key->x, 32))
    return ERR_UNAUTHORIZED;
  if (!sol_pubkey_eq(payouts->owner, params->program_id) || payouts->data_len < PAY_BITMAP ||
      !sol_bytes_eq(payouts->data, DISC_ACCOUNT_PAYOUTS, 8) || !payouts->is_writable ||
      !vault->is_writable || !sol_pubkey_eq(token_program->key, &TOKEN_PROGRAM))
    return ERR_INVALID_ACCOUNT;
  uint8_t *d = payouts->data;
  if (payouts->data_len != PAY_BITMAP + ((uint64_t)get_u32(d + PAY_LEAVES) + 7) / 8)
    return ERR_INVALID_ACCOUNT;
  SolPubkey derived;
  SolSignerSeed vault_seeds[3] = {{SEED_PAYOUT_VAULT, sizeof(SEED_PAYOUT_VAULT) - 1},
                                  {d + PAY_EPOCH, 8}, {d + PAY_VAULT_BUMP, 1}};
  if (sol_create_program_address(vault_seeds, 3, params->program_id, &derived) != 0 ||
      !sol_pubkey_eq(&derived, vault->key) || !is_token_account_of(vault, config->data + CFG_MINT))
    return ERR_INVALID_ACCOUNT;
  if (get_u64(d + PAY_CLAIMED) != get_u64(d + PAY_TOTAL) || get_u64(vault->data + 64) != 0)
    return ERR_INSUFFICIENT; /* a leaf is still unpaid */

  uint8_t data[1] = {9}; /* CloseAccount: its lamports to the authority */
  SolAccountMeta metas[3] = {{vault->key, true, false}, {authority->key, true, false},
                             {payouts->key, false, true}};
  SolInstruction ix = {(SolPubkey *)&TOKEN_PROGRAM, metas, 3, data, 1};
  SolAccountInfo infos[4] = {*vault, *authority, *payouts, *token_program};
  SolSignerSeed seeds[3] = {{SEED_PAYOUT, sizeof(SEED_PAYOUT) - 1}, {d + PAY_EPOCH, 8},
                            {d + PAY_BUMP, 1}};
  SolSignerSeeds signer = {seeds, 3};
  result = sol_invoke_signed_c(&ix, infos, 4, &signer, 1);
  if (result) return result;
  uint64_t rent = *payouts->lamports;
  if (*authority->lamports + rent < rent) return ERR_INVALID_ARGUMENT;
  *authority->lamports += rent;
  *payouts->lamports = 0;
  sol_memset_(d, 0, payouts->data_len);
  return 0;
}

/* ---- entrypoint --------------------------------------------------------------------------- */

uint64_t entrypoint(const uint8_t *input) {
  SolParameters params;
  if (!sol_deserialize(input, &params)) return ERR_INVALID_ACCOUNT;
  if (params.data_len < 8) return ERR_UNKNOWN_INSTRUCTION;
  if (sol_bytes_eq(params.data, DISC_INITIALIZE, 8)) return initialize(&params);
  if (sol_bytes_eq(params.data, DISC_ANCHOR_ROOT, 8)) return anchor_root(&params);
  if (sol_bytes_eq(params.data, DISC_REGISTER_STAKE, 8)) return register_stake(&params);
  if (sol_bytes_eq(params.data, DISC_STAKE, 8)) return stake_tokens(&params);
  if (sol_bytes_eq(params.data, DISC_REQUEST_UNBOND, 8)) return request_unbond(&params);
  if (sol_bytes_eq(params.data, DISC_WITHDRAW, 8)) return withdraw(&params);
  if (sol_bytes_eq(params.data, DISC_OPEN_CASE, 8)) return open_case(&params);
  if (sol_bytes_eq(params.data, DISC_SLASH, 8)) return slash(&params);
  if (sol_bytes_eq(params.data, DISC_CLOSE_EPOCH, 8)) return close_epoch(&params);
  if (sol_bytes_eq(params.data, DISC_CLOSE_CASE, 8)) return close_case(&params);
  if (sol_bytes_eq(params.data, DISC_POST_PAYOUTS, 8)) return post_payouts(&params);
  if (sol_bytes_eq(params.data, DISC_CLAIM, 8)) return claim(&params);
  return ERR_UNKNOWN_INSTRUCTION;
}
