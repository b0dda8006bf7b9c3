package redisstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// DefaultPrefix prefixes every key the Redis store writes. Its hash
// tag puts every key in one Redis Cluster slot, so each script's keys are
// on one node.
const DefaultPrefix = "{volumed}:"

// Config configures a Redis store.
type Config struct {
	// URL is a redis:// or rediss:// URL; its query may set go-redis options
	// such as dial_timeout, read_timeout and max_retries.
	URL string
	// Prefix of every key; default DefaultPrefix. It must hold a
	// non-empty hash tag ("{…}") and nothing else in braces, so that every
	// key hashes to one cluster slot.
	Prefix string
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Store is the state.Store on a Redis server. Every write is one Lua script that
// declares every key it touches in KEYS and checks the record's version
// before its first write, so it is atomic and compare-and-swap; indexes are
// sorted sets and counters a hash, so listing and Stats never scan the
// records. Revisions come from one counter, so a revision is never reused,
// even by a record deleted and written again.
//
// Keys (P is the prefix):
//
//	P rev                     counter: the last revision (and lease token) given
//	P op:<id>                 hash: j operation JSON, v revision
//	P ops:all                 zset of every operation id, score state.Score(CreatedAt)
//	P ops:type:<type>         zset, same scores
//	P ops:status:<status>     zset
//	P ops:volume:<volume_id>  zset
//	P ops:vm:<vm_id>          zset
//	P ops:by:<requested_by>   zset (since format 2)
//	P ops:done                zset of terminal operation ids, score µs of completion
//	P ops:held                zset of the terminal operations the retention holds
//	                          (state.RetainedEnd), taken out of ops:done; same scores
//	P ops:stats               hash: total, type:<t>, status:<s>, terminal, terminal_ns
//	P mapping:<volume_id>     hash: j mapping JSON, v revision
//	P mapping:dev:<vm>:<path> volume id holding the device path on a VM
//	P mappings:vm:<vm_id>     set of volume ids mapped on the VM
//	P mappings:all            set of every mapped volume id
//	P export:<volume_id>      hash: j export JSON, v revision
//	P exports:all             set of every exported volume id
//	P lease:<name>            hash: holder, token; with the lease's TTL
type Store struct {
	rdb       redis.UniversalClient
	p         string
	log       *slog.Logger
	writes    atomic.Int64
	closeOnce sync.Once
	closeErr  error
	// afterListIndex, set by tests only, runs in ListOperations between
	// the read of the index and that of the records.
	afterListIndex func()
}

var _ state.Store = (*Store)(nil)

// Replies of the write scripts other than a new revision.
const (
	replyExists   = -1 // create, and the record exists
	replyGone     = -2 // compare-and-swap, and there is no record
	replyStale    = -3 // compare-and-swap, and the record has another revision
	replyConflict = -4 // the device path is held by another volume
)

// luaCAS defines cas(key, expected): 0 when the record hash at key may be
// written by a writer that read revision expected ("0": none, a create),
// else the reply (replyExists, replyGone, replyStale) to return.
const luaCAS = `
local function cas(key, expected)
  local cur = redis.call('HGET', key, 'v')
  if expected == '0' then
    if cur then return -1 end
    return 0
  end
  if not cur then return -2 end
  if cur ~= expected then return -3 end
  return 0
end
`

// writeOpScript creates or replaces an operation, moves its indexes and
// counts it. KEYS: op, rev counter, stats, done, then ARGV[5] index zsets
// to add the id to, then index zsets to remove it from. ARGV: expected
// revision ("0": create), id, json, score, number of zsets to add to, old
// type, old status (both "" on create), type, status, "1" when it becomes
// terminal now, its duration in ns, its completion score. Returns the new
// revision or a reply constant.
var writeOpScript = redis.NewScript(luaCAS + `
local c = cas(KEYS[1], ARGV[1])
if c ~= 0 then return c end
local rev = redis.call('INCR', KEYS[2])
local id, score, nadd = ARGV[2], ARGV[4], tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'j', ARGV[3], 'v', rev)
for i = 5, 4 + nadd do redis.call('ZADD', KEYS[i], score, id) end
for i = 5 + nadd, #KEYS do redis.call('ZREM', KEYS[i], id) end
if ARGV[1] == '0' then redis.call('HINCRBY', KEYS[3], 'total', 1) end
for _, f in ipairs({{'type:', ARGV[6], ARGV[8]}, {'status:', ARGV[7], ARGV[9]}}) do
  if f[2] ~= f[3] then
    if f[2] ~= '' then redis.call('HINCRBY', KEYS[3], f[1] .. f[2], -1) end
    redis.call('HINCRBY', KEYS[3], f[1] .. f[3], 1)
  end
end
if ARGV[10] == '1' then
  redis.call('HINCRBY', KEYS[3], 'terminal', 1)
  redis.call('HINCRBY', KEYS[3], 'terminal_ns', ARGV[11])
  redis.call('ZADD', KEYS[4], ARGV[12], id)
end
return rev
`)

// deleteOpScript removes an operation at a revision with its index
// entries and counts. KEYS: op, stats, done, then its index zsets. ARGV:
// expected revision, id, type, status, "1" when terminal, minus its
// duration in ns.
// Returns 1, 0 when there is no record, or replyStale.
var deleteOpScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur then return 0 end
if cur ~= ARGV[1] then return -3 end
local id = ARGV[2]
redis.call('DEL', KEYS[1])
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], id) end
redis.call('HINCRBY', KEYS[2], 'total', -1)
redis.call('HINCRBY', KEYS[2], 'type:' .. ARGV[3], -1)
redis.call('HINCRBY', KEYS[2], 'status:' .. ARGV[4], -1)
if ARGV[5] == '1' then
  redis.call('HINCRBY', KEYS[2], 'terminal', -1)
  redis.call('HINCRBY', KEYS[2], 'terminal_ns', ARGV[6])
end
return 1
`)

// holdOpScript moves a terminal operation from the done index to the held
// one if its record is still at the revision read. KEYS: op, done, held.
// ARGV: revision, id, completion score. Returns 1 when moved, 0 when the
// record changed or is gone.
var holdOpScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
`)

// listOpsScript walks the smallest of the index zsets KEYS newest first,
// from after the cursor (ARGV[2] score, "" for none; ARGV[3] id), keeps
// the ids present in every other one, and returns up to ARGV[1]+1 of them
// (ARGV[1] 0: all), each followed by its score: one more than the page,
// so the caller knows whether another page follows, and where the page
// ends even if it leaves out the records of its last ids. It reads no
// record.
var listOpsScript = redis.NewScript(`
local limit = tonumber(ARGV[1])
local walk, best = 1, -1
for i = 1, #KEYS do
  local n = redis.call('ZCARD', KEYS[i])
  if best < 0 or n < best then walk, best = i, n end
end
local max, cs, cid = '+inf', nil, ARGV[3]
if ARGV[2] ~= '' then max, cs = ARGV[2], tonumber(ARGV[2]) end
local out, pos, chunk = {}, 0, 256
if limit > 0 then chunk = limit + 1 end
while true do
  local page = redis.call('ZREVRANGEBYSCORE', KEYS[walk], max, '-inf', 'WITHSCORES', 'LIMIT', pos, chunk)
  if #page == 0 then return out end
  for j = 1, #page, 2 do
    local id = page[j]
    if not (cs and tonumber(page[j + 1]) == cs and id >= cid) then
      local match = true
      for i = 1, #KEYS do
        if i ~= walk and not redis.call('ZSCORE', KEYS[i], id) then match = false; break end
      end
      if match then
        out[#out + 1] = id
        out[#out + 1] = page[j + 1]
        if limit > 0 and #out > 2 * limit then return out end
      end
    end
  end
  pos = pos + chunk
  chunk = math.min(chunk * 2, 1024)
end
`)

// putMappingScript writes a mapping at a revision and moves its indexes.
// KEYS: mapping, all set, rev counter, then the optional keys whose
// positions in KEYS ARGV[4..7] give (0: none): the new device key, the new
// VM set, the old device key, the old VM set. ARGV: expected revision
// ("0": create), volume, json. Returns the new revision or a reply
// constant (replyConflict when another volume holds the device).
var putMappingScript = redis.NewScript(luaCAS + `
local c = cas(KEYS[1], ARGV[1])
if c ~= 0 then return c end
local vol = ARGV[2]
local nd, nv, od, ov = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if nd > 0 then
  local holder = redis.call('GET', KEYS[nd])
  if holder and holder ~= vol then return -4 end
end
if od > 0 and redis.call('GET', KEYS[od]) == vol then redis.call('DEL', KEYS[od]) end
if ov > 0 then redis.call('SREM', KEYS[ov], vol) end
local rev = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'j', ARGV[3], 'v', rev)
if nd > 0 then redis.call('SET', KEYS[nd], vol) end
if nv > 0 then redis.call('SADD', KEYS[nv], vol) end
redis.call('SADD', KEYS[2], vol)
return rev
`)

// deleteMappingScript removes a mapping at a revision and its index
// entries. KEYS: mapping, all set, then the optional device key and VM
// set at the positions ARGV[3] and ARGV[4] give (0: none). ARGV: expected
// revision, volume. Returns 1, 0 when there is none, or replyStale.
var deleteMappingScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur then return 0 end
if cur ~= ARGV[1] then return -3 end
local vol, d, v = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if d > 0 and redis.call('GET', KEYS[d]) == vol then redis.call('DEL', KEYS[d]) end
if v > 0 then redis.call('SREM', KEYS[v], vol) end
redis.call('SREM', KEYS[2], vol)
redis.call('DEL', KEYS[1])
return 1
`)

// putExportScript writes an export at a revision and adds it to the set.
// KEYS: export, all set, rev counter. ARGV: expected revision ("0":
// create), volume, json. Returns the new revision or a reply constant.
var putExportScript = redis.NewScript(luaCAS + `
local c = cas(KEYS[1], ARGV[1])
if c ~= 0 then return c end
local rev = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'j', ARGV[3], 'v', rev)
redis.call('SADD', KEYS[2], ARGV[2])
return rev
`)

// deleteExportScript removes an export and its set entry. KEYS: export,
// all set. ARGV: expected revision ("0": any), volume. Returns 1, 0 when
// there is none, or replyStale.
var deleteExportScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur then return 0 end
if ARGV[1] ~= '0' and cur ~= ARGV[1] then return -3 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
`)

// acquireLeaseScript takes a lease unless another holder has it. KEYS:
// lease, rev counter. ARGV: holder, ttl ms. Returns the token, or 0.
var acquireLeaseScript = redis.NewScript(`
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= ARGV[1] then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
`)

// renewLeaseScript extends a lease still at token ARGV[1] by ARGV[2] ms.
// KEYS: lease, rev counter. Returns the new token, or 0.
var renewLeaseScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
`)

// releaseLeaseScript deletes a lease still at token ARGV[1]. KEYS: lease.
// Returns 1, or 0.
var releaseLeaseScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
`)

// New connects to cfg.URL and pings the server. An unreachable
// server gives an error wrapping state.ErrUnavailable. When the server is a
// Redis Cluster node, the store uses a cluster client seeded with it,
// which finds the other nodes and routes each command to the node of its
// keys' slot.
func New(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := checkHashTag(cfg.Prefix); err != nil {
		return nil, err
	}
	opts, err := redis.ParseURL(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("state: redis url: %w", err)
	}
	// One dial per command: a dead server fails the call after one
	// dial_timeout, so callers answer 503 at once instead of after
	// go-redis's five dials.
	opts.DialerRetries = 1
	r := &Store{rdb: redis.NewClient(opts), p: cfg.Prefix,
		log: cfg.Logger.With("component", "state-redis")}
	cluster, err := r.clusterEnabled(ctx)
	if err == nil && cluster {
		_ = r.rdb.Close()
		if opts.DB != 0 {
			return nil, fmt.Errorf("state: redis url: database %d on Redis Cluster, which has only database 0", opts.DB)
		}
		r.rdb = redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{opts.Addr},
			Username: opts.Username, Password: opts.Password, TLSConfig: opts.TLSConfig, Protocol: opts.Protocol,
			ClientName: opts.ClientName, DialTimeout: opts.DialTimeout, ReadTimeout: opts.ReadTimeout,
			WriteTimeout: opts.WriteTimeout, MaxRetries: opts.MaxRetries, DialerRetries: opts.DialerRetries,
			PoolSize: opts.PoolSize})
		err = r.Ping(ctx)
	}
	if err != nil {
		_ = r.rdb.Close()
		return nil, err
	}
	r.log.Info("state store ready", "addr", opts.Addr, "db", opts.DB, "prefix", cfg.Prefix, "cluster", cluster)
	return r, nil
}

// clusterEnabled asks the server whether it is a Redis Cluster node.
func (r *Store) clusterEnabled(ctx context.Context) (bool, error) {
	info, err := r.rdb.Info(ctx, "cluster").Result()
	if err != nil {
		return false, r.wrap("connect", err)
	}
	return strings.Contains(info, "cluster_enabled:1"), nil
}

// checkHashTag refuses a prefix whose keys would not share a cluster slot:
// Redis hashes the text between the first "{" and the next "}".
func checkHashTag(p string) error {
	i := strings.IndexByte(p, '{')
	j := strings.IndexByte(p[i+1:], '}')
	if i < 0 || j <= 0 || strings.ContainsAny(p[i+1+j+1:], "{}") {
		return fmt.Errorf("state: redis prefix %q needs one hash tag such as {volumed}", p)
	}
	return nil
}

// wrap classifies a go-redis error: server error replies and a cancelled
// caller pass through; anything else (dial errors, timeouts, io.EOF, a
// closed client) means the server could not be reached and wraps
// state.ErrUnavailable.
func (r *Store) wrap(op string, err error) error {
	var reply redis.Error
	if errors.As(err, &reply) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("state: redis %s: %w", op, err)
	}
	return fmt.Errorf("state: redis %s: %w: %w", op, state.ErrUnavailable, err)
}

// runWrite runs a write script and returns its reply, counting a write
// when the reply is positive.
func (r *Store) runWrite(ctx context.Context, name string, s *redis.Script, keys []string, args ...any) (int64, error) {
	n, err := s.Run(ctx, r.rdb, keys, args...).Int64()
	if err != nil {
		return 0, r.wrap(name, err)
	}
	if n > 0 {
		r.writes.Add(1)
	}
	return n, nil
}

// casErr turns a write script's negative reply into its error; exists is
// the error of a create over an existing record.
func casErr(n int64, what, key string, rev uint64, exists error) error {
	switch n {
	case replyExists:
		return fmt.Errorf("state: %s %s: %w", what, key, exists)
	case replyGone:
		return state.Gone(what, key)
	case replyStale:
		return state.Stale(what, key, rev)
	case replyConflict:
		return fmt.Errorf("state: device of %s %s held by another volume: %w", what, key, state.ErrConflict)
	}
	return fmt.Errorf("state: %s %s: unexpected script reply %d", what, key, n)
}

func (r *Store) revKey() string           { return r.p + "rev" }
func (r *Store) opKey(id string) string   { return r.p + "op:" + id }
func (r *Store) idxKey(n string) string   { return r.p + "ops:" + n }
func (r *Store) mapKey(v string) string   { return r.p + "mapping:" + v }
func (r *Store) vmSetKey(v string) string { return r.p + "mappings:vm:" + v }
func (r *Store) exportKey(v string) string {
	return r.p + "export:" + v
}

// devKey is the key of a device path on a VM.
func (r *Store) devKey(vm, dev string) string { return r.p + "mapping:dev:" + vm + ":" + dev }

// record is a stored record hash: its JSON and revision.
type record struct {
	raw []byte
	rev uint64
}

// readRecords reads the record hashes at keys in one pipeline; a key
// without a record gives a record with nil raw.
func (r *Store) readRecords(ctx context.Context, name string, keys []string) ([]record, error) {
	cmds := make([]*redis.SliceCmd, len(keys))
	_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.HMGet(ctx, k, "j", "v")
		}
		return nil
	})
	if err != nil {
		return nil, r.wrap(name, err)
	}
	out := make([]record, len(keys))
	for i, c := range cmds {
		vals := c.Val()
		j, ok1 := vals[0].(string)
		v, ok2 := vals[1].(string)
		if !ok1 || !ok2 {
			continue
		}
		rev, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("state: redis %s: revision %q of %s: %w", name, v, keys[i], err)
		}
		out[i] = record{raw: []byte(j), rev: rev}
	}
	return out, nil
}

// readOne reads one record hash; state.ErrNotFound when there is none.
func (r *Store) readOne(ctx context.Context, what, key string) (record, error) {
	recs, err := r.readRecords(ctx, "get "+what, []string{key})
	if err != nil {
		return record{}, err
	}
	if recs[0].raw == nil {
		return record{}, fmt.Errorf("state: %s %s: %w", what, key, state.ErrNotFound)
	}
	return recs[0], nil
}

// readAt reads the record at key, checking it is at revision rev;
// state.ErrStale (and state.ErrNotFound when it is gone) otherwise.
func readAt[T any](ctx context.Context, r *Store, what, key string, rev uint64) (*T, error) {
	rec, err := r.readOne(ctx, what, key)
	if errors.Is(err, state.ErrNotFound) {
		return nil, state.Gone(what, key)
	}
	if err != nil {
		return nil, err
	}
	if rec.rev != rev {
		return nil, state.Stale(what, key, rev)
	}
	v := new(T)
	if err := state.Decode(key, "", rec.raw, v); err != nil {
		return nil, err
	}
	return v, nil
}

// CreateOperation records op with its indexes and counters in one script.
func (r *Store) CreateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	return r.writeOp(ctx, nil, op)
}

// UpdateOperation checks the change (checkMove) against the record at
// op.Revision, then replaces it and moves its indexes and counters in one
// script that refuses to write unless the record is still at op.Revision.
func (r *Store) UpdateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	if err := state.CheckOperation(op); err != nil {
		return op, err
	}
	old, err := readAt[commands.Operation](ctx, r, "operation", r.opKey(op.ID), op.Revision)
	if err != nil {
		return op, err
	}
	if err := state.CheckMove(*old, op); err != nil {
		return op, err
	}
	return r.writeOp(ctx, old, op)
}

// writeOp creates op (old nil) or replaces old, read at op.Revision.
func (r *Store) writeOp(ctx context.Context, old *commands.Operation, op commands.Operation) (commands.Operation, error) {
	if err := state.CheckOperation(op); err != nil {
		return op, err
	}
	data, err := json.Marshal(op)
	if err != nil {
		return op, fmt.Errorf("state: encode operation %s: %w", op.ID, err)
	}
	add := state.Indexes(op)
	keys := []string{r.opKey(op.ID), r.revKey(), r.idxKey("stats"), r.idxKey("done")}
	for _, n := range add {
		keys = append(keys, r.idxKey(n))
	}
	expected, oldType, oldStatus := "0", "", ""
	if old != nil {
		expected, oldType, oldStatus = strconv.FormatUint(op.Revision, 10), string(old.Type), string(old.Status)
		for _, n := range state.Indexes(*old) {
			if !slices.Contains(add, n) {
				keys = append(keys, r.idxKey(n))
			}
		}
	}
	terminal := "0"
	if op.Status.Terminal() && (old == nil || !old.Status.Terminal()) {
		terminal = "1"
	}
	n, err := r.runWrite(ctx, "write operation", writeOpScript, keys, expected, op.ID, data,
		state.Score(op.CreatedAt), len(add), oldType, oldStatus, string(op.Type), string(op.Status),
		terminal, int64(op.Duration()), state.Score(state.CompletedAt(op)))
	if err != nil {
		return op, err
	}
	if n < 0 {
		return op, casErr(n, "operation", op.ID, op.Revision, state.ErrExists)
	}
	op.Revision = uint64(n)
	return op, nil
}

// DeleteOperation removes the operation at rev with its index entries and
// counts in one script.
func (r *Store) DeleteOperation(ctx context.Context, id string, rev uint64) error {
	rec, err := r.readOne(ctx, "operation", r.opKey(id))
	if errors.Is(err, state.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if rec.rev != rev {
		return state.Stale("operation", id, rev)
	}
	var op commands.Operation
	if err := state.Decode(r.opKey(id), id, rec.raw, &op); err != nil {
		return err
	}
	if err := r.deleteOp(ctx, &op, rev); err != nil && !errors.Is(err, state.ErrNotFound) {
		return err
	}
	return nil
}

// deleteOp removes op, read at rev, with its index entries (the held
// index's too) and counts, unless its record changed since (ErrStale) or
// is gone (ErrStale and ErrNotFound).
func (r *Store) deleteOp(ctx context.Context, op *commands.Operation, rev uint64) error {
	keys := []string{r.opKey(op.ID), r.idxKey("stats"), r.idxKey("done"), r.idxKey("held")}
	for _, n := range state.Indexes(*op) {
		keys = append(keys, r.idxKey(n))
	}
	terminal := "0"
	if op.Status.Terminal() {
		terminal = "1"
	}
	n, err := r.runWrite(ctx, "delete operation", deleteOpScript, keys, rev, op.ID,
		string(op.Type), string(op.Status), terminal, -int64(op.Duration()))
	if err != nil {
		return err
	}
	if n == 0 {
		return state.Gone("operation", op.ID)
	}
	if n < 0 {
		return casErr(n, "operation", op.ID, rev, state.ErrExists)
	}
	return nil
}

// PruneOperations deletes the terminal operations the done index has
// completed before completedBefore, oldest first, then those of the held
// index whose retained end (state.RetainedEnd) is before it. An operation
// of the done index the retention holds moves to the held index, read
// again by each call whose batch the done index does not fill (the last
// of a pass): it is small (open test failovers and their failed
// rollbacks), the done index whole history.
func (r *Store) PruneOperations(ctx context.Context, completedBefore time.Time, limit int) (int, error) {
	n := 0
	var corrupt int64 // the corrupt records passed, left in the index
	for limit <= 0 || n < limit {
		batch := int64(256)
		if limit > 0 {
			batch = min(batch, int64(limit-n))
		}
		ids, err := r.rdb.ZRangeArgs(ctx, redis.ZRangeArgs{Key: r.idxKey("done"), ByScore: true,
			Start: "-inf", Stop: "(" + strconv.FormatInt(state.Score(completedBefore), 10), Offset: corrupt, Count: batch}).Result()
		if err != nil {
			return n, r.wrap("prune operations", err)
		}
		if len(ids) == 0 {
			break
		}
		recs, err := r.readRecords(ctx, "prune operations", r.keysOf(ids, r.opKey))
		if err != nil {
			return n, err
		}
		for i, rec := range recs {
			if rec.raw == nil {
				// No record: a stray index entry; drop it.
				if err := r.rdb.ZRem(ctx, r.idxKey("done"), ids[i]).Err(); err != nil {
					return n, r.wrap("prune operations", err)
				}
				continue
			}
			var op commands.Operation
			if err := state.Decode(r.opKey(ids[i]), ids[i], rec.raw, &op); r.passCorrupt(err) {
				corrupt++
				continue
			} else if err != nil {
				return n, err
			}
			if state.MayHold(op.Type) {
				end, held, err := state.RetainedEnd(ctx, r, op)
				if err != nil {
					return n, err
				}
				if held || state.Score(end) >= state.Score(completedBefore) {
					if _, err := r.runWrite(ctx, "hold operation", holdOpScript,
						[]string{r.opKey(op.ID), r.idxKey("done"), r.idxKey("held")}, rec.rev, op.ID,
						state.Score(state.CompletedAt(op))); err != nil {
						return n, err
					}
					continue // moved, or changed since the read: the next pass reads it again
				}
			}
			err := r.deleteOp(ctx, &op, rec.rev)
			if errors.Is(err, state.ErrStale) {
				continue // annotated (CanAnnotate), or deleted and created again, since the read: read again
			}
			if err != nil {
				return n, err
			}
			n++
		}
	}
	return state.PruneHeld(ctx, r, n, limit, state.Score(completedBefore), r.heldOps, func(op commands.Operation) error {
		return r.deleteOp(ctx, &op, op.Revision)
	})
}

// heldOps reads the operations of the held index, and drops the entries
// of records gone.
func (r *Store) heldOps(ctx context.Context) ([]commands.Operation, error) {
	ids, err := r.rdb.ZRange(ctx, r.idxKey("held"), 0, -1).Result()
	if err != nil {
		return nil, r.wrap("prune held operations", err)
	}
	recs, err := r.readRecords(ctx, "prune held operations", r.keysOf(ids, r.opKey))
	if err != nil {
		return nil, err
	}
	ops := make([]commands.Operation, 0, len(recs))
	for i, rec := range recs {
		if rec.raw == nil {
			if err := r.rdb.ZRem(ctx, r.idxKey("held"), ids[i]).Err(); err != nil {
				return nil, r.wrap("prune held operations", err)
			}
			continue
		}
		var op commands.Operation
		if err := state.Decode(r.opKey(ids[i]), ids[i], rec.raw, &op); r.passCorrupt(err) {
			continue
		} else if err != nil {
			return nil, err
		}
		op.Revision = rec.rev
		ops = append(ops, op)
	}
	return ops, nil
}

// passCorrupt logs err and reports true if it is state.ErrCorrupt: the
// retention passes the record, left for a person to repair, rather than
// stop at it.
func (r *Store) passCorrupt(err error) bool {
	if !errors.Is(err, state.ErrCorrupt) {
		return false
	}
	r.log.Warn("prune passes a corrupt record", "err", err)
	return true
}

// keysOf maps ids to keys.
func (r *Store) keysOf(ids []string, key func(string) string) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = key(id)
	}
	return out
}

// GetOperation reads one operation.
func (r *Store) GetOperation(ctx context.Context, id string) (commands.Operation, error) {
	var op commands.Operation
	rec, err := r.readOne(ctx, "operation", r.opKey(id))
	if err != nil {
		return op, err
	}
	err = state.Decode(r.opKey(id), id, rec.raw, &op)
	op.Revision = rec.rev
	return op, err
}

// ListOperations finds the ids of a page in one script over the index
// zsets of f's fields, then reads their records in one pipeline.
func (r *Store) ListOperations(ctx context.Context, f state.Filter) ([]commands.Operation, string, error) {
	afterScore, afterID, err := state.ParseCursor(f.Cursor)
	if err != nil {
		return nil, "", err
	}
	var keys []string
	for _, name := range state.FilterIndexes(f) {
		keys = append(keys, r.idxKey(name))
	}
	score, id := "", ""
	if afterID != "" {
		score, id = strconv.FormatInt(afterScore, 10), afterID
	}
	found, err := listOpsScript.Run(ctx, r.rdb, keys, f.Limit, score, id).StringSlice()
	if err != nil {
		return nil, "", r.wrap("list operations", err)
	}
	ids := make([]string, 0, len(found)/2)
	for k := 0; k+1 < len(found); k += 2 {
		ids = append(ids, found[k])
	}
	more := f.Limit > 0 && len(ids) > f.Limit
	next := ""
	if more {
		// The next page starts after the last id this one covers, not
		// after the last record kept: a page whose records were all
		// left out still has a next one.
		ids = ids[:f.Limit]
		if next, err = cursorAt(found[2*f.Limit-1], ids[f.Limit-1]); err != nil {
			return nil, "", err
		}
	}
	if r.afterListIndex != nil {
		r.afterListIndex()
	}
	recs, err := r.readRecords(ctx, "list operations", r.keysOf(ids, r.opKey))
	if err != nil {
		return nil, "", err
	}
	out := make([]commands.Operation, 0, len(recs))
	for k, rec := range recs {
		var op commands.Operation
		if rec.raw == nil {
			continue // deleted since the ids were read
		}
		if err := state.Decode(r.opKey(ids[k]), ids[k], rec.raw, &op); err != nil {
			// Skipped as the embedded store's index skips it; a read
			// of the operation reports it.
			r.log.Warn("listing skips a corrupt record", "key", r.opKey(ids[k]), "err", err)
			continue
		}
		op.Revision = rec.rev
		if state.Matches(op, f) { // not moved out of the filter since
			out = append(out, op)
		}
	}
	return out, next, nil
}

// cursorAt is the cursor after id at the index score score, as the
// script returns it: the decimal form of a double holding a state.Score,
// an integer (exact in a double until the year 2255).
func cursorAt(score, id string) (string, error) {
	f, err := strconv.ParseFloat(score, 64)
	if err != nil || f != math.Trunc(f) {
		return "", fmt.Errorf("state: redis index score %q of operation %s is not a time", score, id)
	}
	return state.CursorAt(int64(f), id), nil
}

// Stats reads the counters the write scripts keep.
func (r *Store) Stats(ctx context.Context) (state.Stats, error) {
	h, err := r.rdb.HGetAll(ctx, r.idxKey("stats")).Result()
	if err != nil {
		return state.Stats{}, r.wrap("stats", err)
	}
	s := state.NewStats()
	s.Writes = r.writes.Load()
	for k, v := range h {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return state.Stats{}, fmt.Errorf("state: redis stats field %s=%q: %w", k, v, err)
		}
		switch name, value, _ := strings.Cut(k, ":"); name {
		case "total":
			s.Total = n
		case "terminal":
			s.Terminal = n
		case "terminal_ns":
			s.TerminalDuration = time.Duration(n)
		case "type":
			s.ByType[commands.OpType(value)] = n
		case "status":
			s.ByStatus[commands.OpStatus(value)] = n
		}
	}
	return s, nil
}

// PutMapping writes m and moves its device and VM indexes in one script,
// which checks the revision and the device's holder before writing.
func (r *Store) PutMapping(ctx context.Context, m commands.Mapping) (commands.Mapping, error) {
	if err := state.CheckMapping(m); err != nil {
		return m, err
	}
	data, err := json.Marshal(m)
	if err != nil {
		return m, fmt.Errorf("state: encode mapping %s: %w", m.VolumeID, err)
	}
	old := new(commands.Mapping)
	if m.Revision != 0 {
		// A corrupt record is replaced as if it named no device or VM.
		if old, err = readAt[commands.Mapping](ctx, r, "mapping", r.mapKey(m.VolumeID), m.Revision); errors.Is(err, state.ErrCorrupt) {
			old = new(commands.Mapping)
		} else if err != nil {
			return m, err
		}
	}
	keys := []string{r.mapKey(m.VolumeID), r.p + "mappings:all", r.revKey()}
	pos := func(ok bool, key string) int {
		if !ok {
			return 0
		}
		keys = append(keys, key)
		return len(keys)
	}
	newDev := pos(m.DevicePath != "", r.devKey(m.VMID, m.DevicePath))
	newVM := pos(m.VMID != "", r.vmSetKey(m.VMID))
	oldDev := pos(old.DevicePath != "" && (old.DevicePath != m.DevicePath || old.VMID != m.VMID), r.devKey(old.VMID, old.DevicePath))
	oldVM := pos(old.VMID != "" && old.VMID != m.VMID, r.vmSetKey(old.VMID))
	n, err := r.runWrite(ctx, "put mapping", putMappingScript, keys,
		m.Revision, m.VolumeID, data, newDev, newVM, oldDev, oldVM)
	if err != nil {
		return m, err
	}
	if n == replyConflict {
		// The device key may name a volume whose mapping no longer has
		// the device (a corrupt record replaced or deleted): freed, the
		// write is tried once again.
		freed, err := r.freeStaleDevice(ctx, m.VMID, m.DevicePath)
		if err != nil {
			return m, err
		}
		if freed {
			if n, err = r.runWrite(ctx, "put mapping", putMappingScript, keys,
				m.Revision, m.VolumeID, data, newDev, newVM, oldDev, oldVM); err != nil {
				return m, err
			}
		}
	}
	if n < 0 {
		return m, casErr(n, "mapping", m.VolumeID, m.Revision, state.ErrStale)
	}
	m.Revision = uint64(n)
	return m, nil
}

// freeStaleDeviceScript deletes a device key (KEYS[1]) if it still names
// volume ARGV[1] and that volume's mapping (KEYS[2]) is still at revision
// ARGV[2] ("" for none). Returns 1 when it deleted it.
var freeStaleDeviceScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local cur = redis.call('HGET', KEYS[2], 'v')
if (cur or '') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
`)

// freeStaleDevice deletes the key of device dev on VM vm if the volume it
// names has no mapping or one without that device, as the embedded store
// takes over such a claim. A corrupt mapping of that volume is its error:
// the device is not taken from a record nobody can read.
func (r *Store) freeStaleDevice(ctx context.Context, vm, dev string) (bool, error) {
	holder, err := r.rdb.Get(ctx, r.devKey(vm, dev)).Result()
	if errors.Is(err, redis.Nil) {
		return true, nil
	}
	if err != nil {
		return false, r.wrap("get mapping device", err)
	}
	rev := ""
	rec, err := r.readOne(ctx, "mapping", r.mapKey(holder))
	switch {
	case errors.Is(err, state.ErrNotFound):
	case err != nil:
		return false, err
	default:
		var hm commands.Mapping
		if err := state.Decode(r.mapKey(holder), holder, rec.raw, &hm); err != nil {
			return false, err
		}
		if hm.VMID == vm && hm.DevicePath == dev {
			return false, nil
		}
		rev = strconv.FormatUint(rec.rev, 10)
	}
	n, err := r.runWrite(ctx, "free stale device", freeStaleDeviceScript,
		[]string{r.devKey(vm, dev), r.mapKey(holder)}, holder, rev)
	return n == 1, err
}

// GetMapping reads the mapping of a volume.
func (r *Store) GetMapping(ctx context.Context, volumeID string) (commands.Mapping, error) {
	var m commands.Mapping
	rec, err := r.readOne(ctx, "mapping", r.mapKey(volumeID))
	if err != nil {
		return m, err
	}
	err = state.Decode(r.mapKey(volumeID), volumeID, rec.raw, &m)
	m.Revision = rec.rev
	return m, err
}

// GetMappingByDevice reads the volume holding a device path on a VM, then
// its mapping, which must still hold the device.
func (r *Store) GetMappingByDevice(ctx context.Context, vmID, devicePath string) (commands.Mapping, error) {
	notFound := fmt.Errorf("state: mapping of device %s on %s: %w", devicePath, vmID, state.ErrNotFound)
	if devicePath == "" {
		return commands.Mapping{}, notFound
	}
	vol, err := r.rdb.Get(ctx, r.devKey(vmID, devicePath)).Result()
	if errors.Is(err, redis.Nil) {
		return commands.Mapping{}, notFound
	}
	if err != nil {
		return commands.Mapping{}, r.wrap("get mapping by device", err)
	}
	m, err := r.GetMapping(ctx, vol)
	if errors.Is(err, state.ErrNotFound) || (err == nil && (m.VMID != vmID || m.DevicePath != devicePath)) {
		return commands.Mapping{}, notFound // moved since the device key was read
	}
	return m, err
}

// ListMappings reads the mappings of one VM, or all of them.
func (r *Store) ListMappings(ctx context.Context, vmID string) ([]commands.Mapping, error) {
	set := r.p + "mappings:all"
	if vmID != "" {
		set = r.vmSetKey(vmID)
	}
	ms, err := listSet(ctx, r, "list mappings", set, r.mapKey, func(m *commands.Mapping, rev uint64) bool {
		m.Revision = rev
		return vmID == "" || m.VMID == vmID
	})
	state.SortMappings(ms)
	return ms, err
}

// listSet reads the records of the ids in a set; keep sets the revision
// and drops records that no longer belong.
func listSet[T any](ctx context.Context, r *Store, name, set string, key func(string) string, keep func(*T, uint64) bool) ([]T, error) {
	ids, err := r.rdb.SMembers(ctx, set).Result()
	if err != nil {
		return nil, r.wrap(name, err)
	}
	recs, err := r.readRecords(ctx, name, r.keysOf(ids, key))
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(recs))
	for i, rec := range recs {
		if rec.raw == nil {
			continue
		}
		var v T
		if err := state.Decode(key(ids[i]), ids[i], rec.raw, &v); err != nil {
			// Skipped as the embedded store's index skips it; a read
			// by key reports it.
			r.log.Warn("listing skips a corrupt record", "key", key(ids[i]), "err", err)
			continue
		}
		if keep(&v, rec.rev) {
			out = append(out, v)
		}
	}
	return out, nil
}

// DeleteMapping removes a mapping and its index entries in one script at
// the revision read (rev, or whatever is there when rev is 0).
func (r *Store) DeleteMapping(ctx context.Context, volumeID string, rev uint64) error {
	for {
		rec, err := r.readOne(ctx, "mapping", r.mapKey(volumeID))
		if errors.Is(err, state.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if rev != 0 && rec.rev != rev {
			return state.Stale("mapping", volumeID, rev)
		}
		var m commands.Mapping
		// A corrupt record is deleted as if it named no device or VM.
		if err := state.Decode(r.mapKey(volumeID), volumeID, rec.raw, &m); err != nil && !errors.Is(err, state.ErrCorrupt) {
			return err
		}
		keys := []string{r.mapKey(volumeID), r.p + "mappings:all"}
		dev, vm := 0, 0
		if m.DevicePath != "" {
			keys = append(keys, r.devKey(m.VMID, m.DevicePath))
			dev = len(keys)
		}
		if m.VMID != "" {
			keys = append(keys, r.vmSetKey(m.VMID))
			vm = len(keys)
		}
		n, err := r.runWrite(ctx, "delete mapping", deleteMappingScript, keys, rec.rev, volumeID, dev, vm)
		if err != nil {
			return err
		}
		if n >= 0 {
			return nil
		}
		if rev != 0 {
			return casErr(n, "mapping", volumeID, rev, state.ErrStale)
		}
		// Unconditional, and the mapping changed between the read and
		// the script: delete what is there now.
	}
}

// PutExport writes e and its set entry in one script.
func (r *Store) PutExport(ctx context.Context, e commands.Export) (commands.Export, error) {
	if err := state.CheckExport(e); err != nil {
		return e, err
	}
	data, err := json.Marshal(e)
	if err != nil {
		return e, fmt.Errorf("state: encode export %s: %w", e.VolumeID, err)
	}
	n, err := r.runWrite(ctx, "put export", putExportScript,
		[]string{r.exportKey(e.VolumeID), r.p + "exports:all", r.revKey()}, e.Revision, e.VolumeID, data)
	if err != nil {
		return e, err
	}
	if n < 0 {
		return e, casErr(n, "export", e.VolumeID, e.Revision, state.ErrStale)
	}
	e.Revision = uint64(n)
	return e, nil
}

// GetExport reads the export record of a volume.
func (r *Store) GetExport(ctx context.Context, volumeID string) (commands.Export, error) {
	var e commands.Export
	rec, err := r.readOne(ctx, "export", r.exportKey(volumeID))
	if err != nil {
		return e, err
	}
	err = state.Decode(r.exportKey(volumeID), volumeID, rec.raw, &e)
	e.Revision = rec.rev
	return e, err
}

// ListExports reads every export record.
func (r *Store) ListExports(ctx context.Context) ([]commands.Export, error) {
	es, err := listSet(ctx, r, "list exports", r.p+"exports:all", r.exportKey, func(e *commands.Export, rev uint64) bool {
		e.Revision = rev
		return true
	})
	state.SortExports(es)
	return es, err
}

// DeleteExport removes an export record and its set entry in one script.
func (r *Store) DeleteExport(ctx context.Context, volumeID string, rev uint64) error {
	n, err := r.runWrite(ctx, "delete export", deleteExportScript,
		[]string{r.exportKey(volumeID), r.p + "exports:all"}, rev, volumeID)
	if err == nil && n < 0 {
		err = casErr(n, "export", volumeID, rev, state.ErrStale)
	}
	return err
}

// AcquireLease takes the lease in one script: a hash with the key's own
// TTL, so Redis expires it by its clock; the token comes from the
// revision counter.
func (r *Store) AcquireLease(ctx context.Context, name, holder string, ttl time.Duration) (state.Lease, error) {
	if err := state.CheckLease(name, holder, ttl); err != nil {
		return state.Lease{}, err
	}
	start := time.Now()
	n, err := r.runWrite(ctx, "acquire lease", acquireLeaseScript,
		[]string{r.p + "lease:" + name, r.revKey()}, holder, ttl.Milliseconds())
	if err != nil {
		return state.Lease{}, err
	}
	if n == 0 {
		return state.Lease{}, fmt.Errorf("state: lease %s: %w", name, state.ErrLeaseHeld)
	}
	return state.Lease{Name: name, Holder: holder, Token: uint64(n), Expires: start.Add(ttl), TTL: ttl}, nil
}

// RenewLease extends the lease if it is still at l.Token.
func (r *Store) RenewLease(ctx context.Context, l state.Lease) (state.Lease, error) {
	if err := state.CheckLease(l.Name, l.Holder, l.TTL); err != nil {
		return state.Lease{}, err
	}
	start := time.Now()
	n, err := r.runWrite(ctx, "renew lease", renewLeaseScript,
		[]string{r.p + "lease:" + l.Name, r.revKey()}, l.Token, l.TTL.Milliseconds())
	if err != nil {
		return state.Lease{}, err
	}
	if n == 0 {
		return state.Lease{}, fmt.Errorf("state: lease %s: %w", l.Name, state.ErrLeaseLost)
	}
	l.Token, l.Expires = uint64(n), start.Add(l.TTL)
	return l, nil
}

// ReleaseLease deletes the lease if it is still at l.Token.
func (r *Store) ReleaseLease(ctx context.Context, l state.Lease) error {
	n, err := r.runWrite(ctx, "release lease", releaseLeaseScript, []string{r.p + "lease:" + l.Name}, l.Token)
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("state: lease %s: %w", l.Name, state.ErrLeaseLost)
	}
	return nil
}

// Ping checks the server answers.
func (r *Store) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return r.wrap("ping", err)
	}
	return nil
}

// Close closes the connection pool. Closing twice is safe.
func (r *Store) Close(context.Context) error {
	r.closeOnce.Do(func() { r.closeErr = r.rdb.Close() })
	return r.closeErr
}
