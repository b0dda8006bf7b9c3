package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
)

// DefaultRedisPrefix prefixes every key the Redis store writes.
const DefaultRedisPrefix = "volumed:"

// RedisConfig configures a Redis store.
type RedisConfig struct {
	// URL is a redis:// or rediss:// URL; its query may set go-redis options
	// such as dial_timeout, read_timeout and max_retries.
	URL string
	// Prefix of every key; default DefaultRedisPrefix.
	Prefix string
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Redis is the Store on a Redis server. Every write is one Lua script, so
// it is atomic; indexes are sorted sets and counters a hash, so listing and
// Stats never scan the records.
//
// Keys (P is the prefix):
//
//	P op:<id>                 operation JSON
//	P ops:all                 zset of every operation id, score opScore(CreatedAt)
//	P ops:type:<type>         zset, same scores
//	P ops:status:<status>     zset
//	P ops:volume:<volume_id>  zset
//	P ops:vm:<vm_id>          zset
//	P ops:terminal            set of ids already counted as terminal
//	P ops:stats               hash: total, type:<t>, status:<s>, terminal, terminal_ns
//	P mapping:<volume_id>     mapping JSON
//	P mapping:dev:<vm>:<path> volume id holding the device path on a VM
//	P mappings:vm:<vm_id>     set of volume ids mapped on the VM
//	P mappings:all            set of every mapped volume id
//	P export:<volume_id>      export JSON
//	P exports:all             set of every exported volume id
type Redis struct {
	rdb       *redis.Client
	p         string
	log       *slog.Logger
	writes    atomic.Int64
	closeOnce sync.Once
	closeErr  error
}

var _ Store = (*Redis)(nil)

// luaField defines field(obj, name): a string field of a decoded JSON
// object, "" when absent or null. Every script that decodes a record
// decodes it before its first write, so a bad record writes nothing.
const luaField = `
local function field(obj, name)
  local v = obj[name]
  if type(v) == 'string' then return v end
  return ''
end
`

// writeOpScript creates (ARGV[1] "create") or replaces ("update") an
// operation with its indexes and counters. Returns 0 when the id exists
// (create) or does not (update), 1 on success.
// KEYS: op, stats, all, terminal set. ARGV: mode, prefix, id, json, score,
// type, status, volume, vm, terminal ("1"/"0"), duration ns.
var writeOpScript = redis.NewScript(luaField + `
local old = redis.call('GET', KEYS[1])
if (ARGV[1] == 'create') == (old ~= false) then return 0 end
local was = {type = '', status = '', volume = '', vm = ''}
if old then
  local o = cjson.decode(old)
  was = {type = field(o, 'type'), status = field(o, 'status'), volume = field(o, 'volume_id'), vm = field(o, 'vm_id')}
end
local now = {type = ARGV[6], status = ARGV[7], volume = ARGV[8], vm = ARGV[9]}
local p, id, score = ARGV[2], ARGV[3], ARGV[5]
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], score, id)
for _, dim in ipairs({'type', 'status', 'volume', 'vm'}) do
  if was[dim] ~= '' and was[dim] ~= now[dim] then
    redis.call('ZREM', p .. 'ops:' .. dim .. ':' .. was[dim], id)
  end
  if now[dim] ~= '' then
    redis.call('ZADD', p .. 'ops:' .. dim .. ':' .. now[dim], score, id)
  end
end
if not old then redis.call('HINCRBY', KEYS[2], 'total', 1) end
for _, dim in ipairs({'type', 'status'}) do
  if was[dim] ~= now[dim] then
    if was[dim] ~= '' then redis.call('HINCRBY', KEYS[2], dim .. ':' .. was[dim], -1) end
    redis.call('HINCRBY', KEYS[2], dim .. ':' .. now[dim], 1)
  end
end
if ARGV[10] == '1' and redis.call('SADD', KEYS[4], id) == 1 then
  redis.call('HINCRBY', KEYS[2], 'terminal', 1)
  redis.call('HINCRBY', KEYS[2], 'terminal_ns', ARGV[11])
end
return 1
`)

// listOpsScript walks the smallest of the index zsets KEYS newest first,
// keeps the ids present in every other one, and returns up to ARGV[1]
// records (0: all) read from ARGV[2]..id. It stops at the limit, so it
// reads no record that does not match and walks no further than needed.
var listOpsScript = redis.NewScript(`
local limit = tonumber(ARGV[1])
local walk, best = 1, -1
for i = 1, #KEYS do
  local n = redis.call('ZCARD', KEYS[i])
  if best < 0 or n < best then walk, best = i, n end
end
local out, pos, chunk = {}, 0, 256
if limit > 0 then chunk = limit end
while pos < best do
  local ids = redis.call('ZREVRANGE', KEYS[walk], pos, pos + chunk - 1)
  for _, id in ipairs(ids) do
    local match = true
    for i = 1, #KEYS do
      if i ~= walk and not redis.call('ZSCORE', KEYS[i], id) then match = false; break end
    end
    if match then
      out[#out + 1] = redis.call('GET', ARGV[2] .. id)
      if #out == limit then return out end
    end
  end
  pos = pos + chunk
  chunk = math.min(chunk * 2, 1024)
end
return out
`)

// luaUnindexMapping defines devkey(p, vm, dev), the key of a device path
// on a VM, and unindex(p, vol, old, dev, vm): drop the device-path and VM
// index entries of the old mapping JSON that differ from dev and vm. It
// decodes before writing.
const luaUnindexMapping = luaField + `
local function devkey(p, vm, dev) return p .. 'mapping:dev:' .. vm .. ':' .. dev end
local function unindex(p, vol, old, dev, vm)
  local o = cjson.decode(old)
  local odev, ovm = field(o, 'device_path'), field(o, 'vm_id')
  if odev ~= '' and (odev ~= dev or ovm ~= vm) and redis.call('GET', devkey(p, ovm, odev)) == vol then
    redis.call('DEL', devkey(p, ovm, odev))
  end
  if ovm ~= '' and ovm ~= vm then redis.call('SREM', p .. 'mappings:vm:' .. ovm, vol) end
end
`

// putMappingScript writes a mapping and moves its indexes; 0 when another
// volume holds the device path on the VM. KEYS: mapping, all set. ARGV:
// prefix, volume, json, device path, vm.
var putMappingScript = redis.NewScript(luaUnindexMapping + `
local p, vol, dev, vm = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
if dev ~= '' then
  local holder = redis.call('GET', devkey(p, vm, dev))
  if holder and holder ~= vol then return 0 end
end
local old = redis.call('GET', KEYS[1])
if old then unindex(p, vol, old, dev, vm) end
redis.call('SET', KEYS[1], ARGV[3])
if dev ~= '' then redis.call('SET', devkey(p, vm, dev), vol) end
if vm ~= '' then redis.call('SADD', p .. 'mappings:vm:' .. vm, vol) end
redis.call('SADD', KEYS[2], vol)
return 1
`)

// deleteMappingScript removes a mapping and its index entries; 0 when
// there was none. KEYS: mapping, all set. ARGV: prefix, volume.
var deleteMappingScript = redis.NewScript(luaUnindexMapping + `
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
unindex(ARGV[1], ARGV[2], old, '', '')
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
`)

// listSetScript returns the records ARGV[1]..member of the set KEYS[1].
var listSetScript = redis.NewScript(`
local out = {}
for i, vol in ipairs(redis.call('SMEMBERS', KEYS[1])) do out[i] = redis.call('GET', ARGV[1] .. vol) end
return out
`)

// putExportScript writes an export and adds it to the set. KEYS: export,
// all set. ARGV: volume, json.
var putExportScript = redis.NewScript(`
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
`)

// deleteExportScript removes an export and its set entry; 0 when there was
// none. KEYS: export, all set. ARGV: volume.
var deleteExportScript = redis.NewScript(`
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
`)

// mappingByDeviceScript returns the mapping whose volume KEYS[1] names.
var mappingByDeviceScript = redis.NewScript(`
local vol = redis.call('GET', KEYS[1])
if not vol then return false end
return redis.call('GET', ARGV[1] .. vol)
`)

// NewRedis connects to cfg.URL and pings the server. An unreachable
// server gives an error wrapping ErrUnavailable.
func NewRedis(ctx context.Context, cfg RedisConfig) (*Redis, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultRedisPrefix
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	opts, err := redis.ParseURL(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("state: redis url: %w", err)
	}
	// One dial per command: a dead server fails the call after one
	// dial_timeout, so callers answer 503 at once instead of after
	// go-redis's five dials.
	opts.DialerRetries = 1
	r := &Redis{rdb: redis.NewClient(opts), p: cfg.Prefix,
		log: cfg.Logger.With("component", "state-redis")}
	if err := r.Ping(ctx); err != nil {
		_ = r.rdb.Close()
		return nil, err
	}
	r.log.Info("state store ready", "addr", opts.Addr, "db", opts.DB, "prefix", cfg.Prefix)
	return r, nil
}

// wrap classifies a go-redis error: server error replies and a cancelled
// caller pass through; anything else (dial errors, timeouts, io.EOF, a
// closed client) means the server could not be reached and wraps
// ErrUnavailable.
func (r *Redis) wrap(op string, err error) error {
	var reply redis.Error
	if errors.As(err, &reply) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("state: redis %s: %w", op, err)
	}
	return fmt.Errorf("state: redis %s: %w: %w", op, ErrUnavailable, err)
}

// runWrite runs a write script; it reports whether the script wrote
// (returned 1) and counts the write.
func (r *Redis) runWrite(ctx context.Context, name string, s *redis.Script, keys []string, args ...any) (bool, error) {
	n, err := s.Run(ctx, r.rdb, keys, args...).Int()
	if err != nil {
		return false, r.wrap(name, err)
	}
	if n == 1 {
		r.writes.Add(1)
	}
	return n == 1, nil
}

func (r *Redis) opKey(id string) string { return r.p + "op:" + id }

func (r *Redis) writeOp(ctx context.Context, mode string, op commands.Operation) (bool, error) {
	if err := checkOp(&op); err != nil {
		return false, err
	}
	data, err := json.Marshal(op)
	if err != nil {
		return false, fmt.Errorf("state: encode operation %s: %w", op.ID, err)
	}
	terminal := "0"
	if op.Status.Terminal() {
		terminal = "1"
	}
	keys := []string{r.opKey(op.ID), r.p + "ops:stats", r.p + "ops:all", r.p + "ops:terminal"}
	return r.runWrite(ctx, mode+" operation", writeOpScript, keys, mode, r.p, op.ID, data,
		opScore(op.CreatedAt), string(op.Type), string(op.Status), op.VolumeID, vmOf(&op),
		terminal, int64(op.Duration()))
}

// CreateOperation records op with its indexes and counters in one script.
func (r *Redis) CreateOperation(ctx context.Context, op commands.Operation) error {
	ok, err := r.writeOp(ctx, "create", op)
	if err == nil && !ok {
		return fmt.Errorf("state: operation %s: %w", op.ID, ErrExists)
	}
	return err
}

// UpdateOperation replaces op and moves its indexes and counters in one
// script.
func (r *Redis) UpdateOperation(ctx context.Context, op commands.Operation) error {
	ok, err := r.writeOp(ctx, "update", op)
	if err == nil && !ok {
		return fmt.Errorf("state: operation %s: %w", op.ID, ErrNotFound)
	}
	return err
}

// GetOperation reads one operation.
func (r *Redis) GetOperation(ctx context.Context, id string) (commands.Operation, error) {
	var op commands.Operation
	data, err := r.rdb.Get(ctx, r.opKey(id)).Bytes()
	if errors.Is(err, redis.Nil) {
		return op, fmt.Errorf("state: operation %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return op, r.wrap("get operation", err)
	}
	return op, decode(data, &op)
}

// ListOperations intersects the index zsets of f's fields in one script.
func (r *Redis) ListOperations(ctx context.Context, f Filter) ([]commands.Operation, error) {
	var keys []string
	for _, name := range filterIndexes(f) {
		keys = append(keys, r.p+"ops:"+name)
	}
	rows, err := listOpsScript.Run(ctx, r.rdb, keys, f.Limit, r.p+"op:").Slice()
	if err != nil {
		return nil, r.wrap("list operations", err)
	}
	return decodeRows[commands.Operation](rows)
}

// Stats reads the counters the write scripts keep.
func (r *Redis) Stats(ctx context.Context) (Stats, error) {
	h, err := r.rdb.HGetAll(ctx, r.p+"ops:stats").Result()
	if err != nil {
		return Stats{}, r.wrap("stats", err)
	}
	s := newStats()
	s.Writes = r.writes.Load()
	for k, v := range h {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return Stats{}, fmt.Errorf("state: redis stats field %s=%q: %w", k, v, err)
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

// PutMapping writes m and moves its device and VM indexes in one script.
func (r *Redis) PutMapping(ctx context.Context, m commands.Mapping) error {
	if m.VolumeID == "" {
		return errors.New("state: mapping without volume id")
	}
	data, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("state: encode mapping %s: %w", m.VolumeID, err)
	}
	ok, err := r.runWrite(ctx, "put mapping", putMappingScript,
		[]string{r.p + "mapping:" + m.VolumeID, r.p + "mappings:all"},
		r.p, m.VolumeID, data, m.DevicePath, m.VMID)
	if err == nil && !ok {
		return fmt.Errorf("state: device %s of volume %s: %w", m.DevicePath, m.VolumeID, ErrConflict)
	}
	return err
}

// GetMapping reads the mapping of a volume.
func (r *Redis) GetMapping(ctx context.Context, volumeID string) (commands.Mapping, error) {
	data, err := r.rdb.Get(ctx, r.p+"mapping:"+volumeID).Result()
	return r.readMapping("get mapping", volumeID, data, err)
}

// GetMappingByDevice reads the mapping holding a device path on a VM.
func (r *Redis) GetMappingByDevice(ctx context.Context, vmID, devicePath string) (commands.Mapping, error) {
	data, err := mappingByDeviceScript.Run(ctx, r.rdb,
		[]string{r.p + "mapping:dev:" + vmID + ":" + devicePath}, r.p+"mapping:").Text()
	return r.readMapping("get mapping by device", devicePath, data, err)
}

// readMapping decodes the reply of a single-mapping read.
func (r *Redis) readMapping(name, key, data string, err error) (commands.Mapping, error) {
	var m commands.Mapping
	if errors.Is(err, redis.Nil) {
		return m, fmt.Errorf("state: mapping %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return m, r.wrap(name, err)
	}
	return m, decode([]byte(data), &m)
}

// ListMappings reads the mappings of one VM, or all of them.
func (r *Redis) ListMappings(ctx context.Context, vmID string) ([]commands.Mapping, error) {
	set := r.p + "mappings:all"
	if vmID != "" {
		set = r.p + "mappings:vm:" + vmID
	}
	rows, err := listSetScript.Run(ctx, r.rdb, []string{set}, r.p+"mapping:").Slice()
	if err != nil {
		return nil, r.wrap("list mappings", err)
	}
	ms, err := decodeRows[commands.Mapping](rows)
	sortMappings(ms)
	return ms, err
}

// DeleteMapping removes a mapping and its index entries in one script.
func (r *Redis) DeleteMapping(ctx context.Context, volumeID string) error {
	_, err := r.runWrite(ctx, "delete mapping", deleteMappingScript,
		[]string{r.p + "mapping:" + volumeID, r.p + "mappings:all"}, r.p, volumeID)
	return err
}

func (r *Redis) exportKeys(volumeID string) []string {
	return []string{r.p + "export:" + volumeID, r.p + "exports:all"}
}

// PutExport writes e and its set entry in one script.
func (r *Redis) PutExport(ctx context.Context, e commands.Export) error {
	if err := checkExport(e); err != nil {
		return err
	}
	data, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("state: encode export %s: %w", e.VolumeID, err)
	}
	_, err = r.runWrite(ctx, "put export", putExportScript, r.exportKeys(e.VolumeID), e.VolumeID, data)
	return err
}

// GetExport reads the export record of a volume.
func (r *Redis) GetExport(ctx context.Context, volumeID string) (commands.Export, error) {
	var e commands.Export
	data, err := r.rdb.Get(ctx, r.p+"export:"+volumeID).Bytes()
	if errors.Is(err, redis.Nil) {
		return e, fmt.Errorf("state: export %s: %w", volumeID, ErrNotFound)
	}
	if err != nil {
		return e, r.wrap("get export", err)
	}
	return e, decode(data, &e)
}

// ListExports reads every export record in one script.
func (r *Redis) ListExports(ctx context.Context) ([]commands.Export, error) {
	rows, err := listSetScript.Run(ctx, r.rdb, []string{r.p + "exports:all"}, r.p+"export:").Slice()
	if err != nil {
		return nil, r.wrap("list exports", err)
	}
	es, err := decodeRows[commands.Export](rows)
	sortExports(es)
	return es, err
}

// DeleteExport removes an export record and its set entry in one script.
func (r *Redis) DeleteExport(ctx context.Context, volumeID string) error {
	_, err := r.runWrite(ctx, "delete export", deleteExportScript, r.exportKeys(volumeID), volumeID)
	return err
}

// Ping checks the server answers.
func (r *Redis) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return r.wrap("ping", err)
	}
	return nil
}

// Close closes the connection pool. Closing twice is safe.
func (r *Redis) Close(context.Context) error {
	r.closeOnce.Do(func() { r.closeErr = r.rdb.Close() })
	return r.closeErr
}
