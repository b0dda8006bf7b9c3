package redisstore_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
	"github.com/volumed/volumed/stores/storetest"
)

// prefixes gives every store of a test process its own key prefix.
var prefixes atomic.Int64

// fastFail makes a dead server answer within a fraction of a second.
const fastFail = "?dial_timeout=200ms&read_timeout=500ms&write_timeout=500ms&max_retries=-1"

func newRedis(t testing.TB, url string) (*redisstore.Store, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	prefix := fmt.Sprintf("{test%d}:", prefixes.Add(1))
	s, err := redisstore.New(ctx, redisstore.Config{URL: url, Prefix: prefix})
	if err != nil {
		t.Fatalf("new redis store: %v", err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s, prefix
}

func TestRedisConformance(t *testing.T) {
	r := testenv.StartRedis(t)
	storetest.Run(t, func(t testing.TB) state.Store {
		s, _ := newRedis(t, r.URL())
		return s
	})
}

func TestRedisUnavailable(t *testing.T) {
	r := testenv.StartRedis(t)
	s, _ := newRedis(t, r.URL()+fastFail)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	op, err := s.CreateOperation(ctx, storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	r.Stop()

	closed, _ := newRedis(t, testenv.StartRedis(t).URL())
	if err := closed.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for name, store := range map[string]state.Store{"server killed": s, "store closed": closed} {
		t.Run(name, func(t *testing.T) {
			for _, call := range storetest.Calls(op) {
				if err := call.Fn(ctx, store); !errors.Is(err, state.ErrUnavailable) {
					t.Errorf("%s: %v, want ErrUnavailable", call.Name, err)
				}
			}
		})
	}
	t.Run("connect to a dead server", func(t *testing.T) {
		_, err := redisstore.New(ctx, redisstore.Config{URL: r.URL() + fastFail})
		if !errors.Is(err, state.ErrUnavailable) {
			t.Fatalf("New: %v, want ErrUnavailable", err)
		}
	})
	t.Run("bad url is not unavailability", func(t *testing.T) {
		_, err := redisstore.New(ctx, redisstore.Config{URL: "http://" + r.Addr})
		if err == nil || errors.Is(err, state.ErrUnavailable) {
			t.Fatalf("New with an http url: %v", err)
		}
	})
}

// TestRedisFailedScriptWritesNothing: Redis does not roll a script back,
// so the old record is decoded before the script runs. A record that
// cannot be decoded makes the update fail with nothing written.
func TestRedisFailedScriptWritesNothing(t *testing.T) {
	r := testenv.StartRedis(t)
	s, p := newRedis(t, r.URL())
	raw := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer raw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	op, err := s.CreateOperation(ctx, storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "", time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	if err := raw.HSet(ctx, p+"op:"+op.ID, "j", "{not json").Err(); err != nil {
		t.Fatal(err)
	}
	before := dump(ctx, t, raw, p)

	done := time.Now()
	op.Status, op.VolumeID, op.CompletedAt = commands.StatusCompleted, "vol-2", &done
	vm := "vm-2"
	op.VMID = &vm
	if _, err := s.UpdateOperation(ctx, op); err == nil || errors.Is(err, state.ErrUnavailable) {
		t.Fatalf("update over a bad record: %v", err)
	}
	after := dump(ctx, t, raw, p)
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("failed scripts changed the data:\nbefore %v\nafter  %v", before, after)
	}
}

// dump returns every key under prefix p with its type and content.
func dump(ctx context.Context, t *testing.T, raw *redis.Client, p string) map[string]string {
	t.Helper()
	keys, err := raw.Keys(ctx, p+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]string)
	for _, k := range keys {
		typ := raw.Type(ctx, k).Val()
		switch typ {
		case "string":
			out[k] = raw.Get(ctx, k).Val()
		case "zset":
			out[k] = fmt.Sprint(raw.ZRangeWithScores(ctx, k, 0, -1).Val())
		case "set":
			out[k] = fmt.Sprint(raw.SMembers(ctx, k).Val())
		case "hash":
			out[k] = fmt.Sprint(raw.HGetAll(ctx, k).Val())
		default:
			out[k] = typ
		}
	}
	return out
}

// checkScript verifies, in one atomic snapshot, that every operation
// record sits in the indexes of its fields and that the counters match
// the indexes. It returns "" or the first mismatch.
var checkScript = redis.NewScript(`
local p = ARGV[1]
local ids = redis.call('ZRANGE', p .. 'ops:all', 0, -1)
local pending = 0
for _, id in ipairs(ids) do
  local o = cjson.decode(redis.call('HGET', p .. 'op:' .. id, 'j'))
  for _, k in ipairs({'ops:type:' .. o.type, 'ops:status:' .. o.status, 'ops:volume:' .. o.volume_id}) do
    if not redis.call('ZSCORE', p .. k, id) then return id .. ' missing from ' .. k end
  end
  if o.status == 'pending' then pending = pending + 1 end
end
local total = tonumber(redis.call('HGET', p .. 'ops:stats', 'total') or '0')
if total ~= #ids then return 'total ' .. total .. ' for ' .. #ids .. ' records' end
for _, st in ipairs({'pending', 'executing', 'completed'}) do
  local n = tonumber(redis.call('HGET', p .. 'ops:stats', 'status:' .. st) or '0')
  if n ~= redis.call('ZCARD', p .. 'ops:status:' .. st) then return 'counter of ' .. st .. ' is ' .. n end
end
if redis.call('ZCARD', p .. 'ops:status:pending') ~= pending then return 'pending index has strays' end
return ''
`)

// TestRedisWritesAreAtomic runs writers that move operations between
// indexes while a checker script, atomic like the writes, verifies that
// records, indexes and counters never disagree.
func TestRedisWritesAreAtomic(t *testing.T) {
	r := testenv.StartRedis(t)
	s, p := newRedis(t, r.URL())
	raw := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer raw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	const writers, perWriter = 4, 50
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range writers {
		wg.Go(func() {
			for i := range perWriter {
				op, err := s.CreateOperation(ctx, storetest.Op(w*perWriter+i, commands.OpCreate, commands.StatusPending, fmt.Sprintf("vol-%d", i%3), "", time.Now()))
				if err != nil {
					t.Error(err)
					return
				}
				for _, st := range []commands.OpStatus{commands.StatusExecuting, commands.StatusCompleted} {
					op.Status, op.VolumeID = st, fmt.Sprintf("vol-%d", (i+1)%3)
					if op, err = s.UpdateOperation(ctx, op); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	checked := make(chan int)
	go func() {
		n := 0
		defer func() { checked <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			msg, err := checkScript.Run(ctx, raw, nil, p).Text()
			if err != nil || msg != "" {
				t.Errorf("inconsistent snapshot after %d checks: %q, %v", n, msg, err)
				return
			}
			n++
		}
	}()
	wg.Wait()
	close(stop)
	t.Logf("%d consistent snapshots during the writes", <-checked)
	if msg, err := checkScript.Run(ctx, raw, nil, p).Text(); err != nil || msg != "" {
		t.Fatalf("final state: %q, %v", msg, err)
	}
}

func BenchmarkRedis(b *testing.B) {
	r := testenv.StartRedis(b)
	storetest.Bench(b, func(t testing.TB) state.Store {
		s, _ := newRedis(t, r.URL())
		return s
	})
}

// monitorArg matches one quoted argument of a MONITOR line.
var monitorArg = regexp.MustCompile(`"((?:[^"\\]|\\.)*)"`)

// TestRedisScriptsDeclareTheirKeys runs the conformance suite under
// MONITOR and checks, for every command a script ran, that its key was
// declared in the script's KEYS and carries the prefix's hash tag, so
// that the scripts run on Redis Cluster. Every command the store sends
// outside scripts must also carry the hash tag.
func TestRedisScriptsDeclareTheirKeys(t *testing.T) {
	r := testenv.StartRedis(t)
	raw := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer raw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// MONITOR on a plain connection: go-redis's gives up on an idle read.
	conn, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("MONITOR\r\n")); err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(conn)
	if l, err := rd.ReadString('\n'); err != nil || !strings.HasPrefix(l, "+OK") {
		t.Fatalf("MONITOR: %q, %v", l, err)
	}
	var got []string
	var scripts, scripted atomic.Int64
	drained := make(chan error, 1)
	go func() {
		for {
			l, err := rd.ReadString('\n')
			if err != nil {
				drained <- err
				return
			}
			got = append(got, l)
			if strings.Contains(l, `"monitor-end"`) {
				drained <- nil
				return
			}
		}
	}()
	storetest.Run(t, func(t testing.TB) state.Store {
		s, _ := newRedis(t, r.URL())
		return s
	})
	if err := raw.Echo(ctx, "monitor-end").Err(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("MONITOR: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("MONITOR did not show the end marker")
	}

	var declared map[string]bool
	for _, l := range got {
		var args []string
		for _, m := range monitorArg.FindAllStringSubmatch(l, -1) {
			a, err := strconv.Unquote(`"` + m[1] + `"`)
			if err != nil {
				t.Fatalf("unquote %q in %q: %v", m[1], l, err)
			}
			args = append(args, a)
		}
		if len(args) < 2 {
			continue
		}
		cmd := strings.ToLower(args[0])
		switch {
		case strings.Contains(l, "[0 lua]"):
			scripted.Add(1)
			if !declared[args[1]] {
				t.Errorf("a script touched the undeclared key %q: %s", args[1], l)
			}
		case cmd == "evalsha" || cmd == "eval":
			scripts.Add(1)
			n, err := strconv.Atoi(args[2])
			if err != nil || 3+n > len(args) {
				t.Fatalf("bad %s: %s", cmd, l)
			}
			declared = make(map[string]bool)
			for _, k := range args[3 : 3+n] {
				declared[k] = true
				if !strings.HasPrefix(k, "{test") {
					t.Errorf("script key %q has no hash tag", k)
				}
			}
		case cmd == "hmget" || cmd == "get" || cmd == "smembers" || cmd == "zrange" || cmd == "zrem" || cmd == "hgetall":
			if !strings.HasPrefix(args[1], "{test") {
				t.Errorf("key %q has no hash tag: %s", args[1], l)
			}
		}
	}
	if scripts.Load() < 100 || scripted.Load() < 500 {
		t.Fatalf("saw %d scripts running %d commands: MONITOR missed them", scripts.Load(), scripted.Load())
	}
	t.Logf("%d scripts ran %d commands, each on a declared key", scripts.Load(), scripted.Load())
}

// BenchmarkRedisMemory measures redis-server's used_memory per 100k
// operations, and after pruning them.
func BenchmarkRedisMemory(b *testing.B) {
	r := testenv.StartRedis(b)
	s, _ := newRedis(b, r.URL())
	raw := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer raw.Close()
	storetest.MeasureMemory(b, s, func() int64 {
		info, err := raw.Info(context.Background(), "memory").Result()
		if err != nil {
			b.Fatal(err)
		}
		for _, l := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(l, "used_memory:"); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					b.Fatal(err)
				}
				return n
			}
		}
		b.Fatal("no used_memory in INFO memory")
		return 0
	})
}

// startCluster starts n redis-server nodes as one Redis Cluster, the
// slots split evenly between them, and waits until every node says the
// cluster is ok.
func startCluster(t *testing.T, n int) []*testenv.Redis {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var nodes []*testenv.Redis
	var clients []*redis.Client
	for i := range n {
		node := testenv.StartRedis(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000")
		c := redis.NewClient(&redis.Options{Addr: node.Addr})
		t.Cleanup(func() { _ = c.Close() })
		lo, hi := i*16384/n, (i+1)*16384/n-1
		if err := c.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", lo, hi).Err(); err != nil {
			t.Fatalf("node %d slots %d-%d: %v", i, lo, hi, err)
		}
		if i > 0 {
			host, port, _ := net.SplitHostPort(nodes[0].Addr)
			if err := c.ClusterMeet(ctx, host, port).Err(); err != nil {
				t.Fatalf("node %d meets node 0: %v", i, err)
			}
		}
		nodes, clients = append(nodes, node), append(clients, c)
	}
	testenv.Eventually(t, 20*time.Second, func() bool {
		for _, c := range clients {
			info, err := c.ClusterInfo(ctx).Result()
			slots, serr := c.ClusterSlots(ctx).Result()
			if err != nil || serr != nil || !strings.Contains(info, "cluster_state:ok") || len(slots) != n {
				return false
			}
		}
		return true
	}, "a %d-node cluster", n)
	return nodes
}

// TestRedisClusterConformance runs the conformance suite on a three-node
// Redis Cluster: each store's keys share its prefix's hash tag, so each
// store lives on one node, and the stores of the suite spread over all
// three; a script with a key in another slot would fail there.
func TestRedisClusterConformance(t *testing.T) {
	nodes := startCluster(t, 3)
	storetest.Run(t, func(t testing.TB) state.Store {
		s, _ := newRedis(t, nodes[0].URL())
		return s
	})
	t.Run("prefix without a hash tag is refused", func(t *testing.T) {
		for _, p := range []string{"volumed:", "{}:", "{a}{b}:", "{a"} {
			if _, err := redisstore.New(context.Background(), redisstore.Config{URL: nodes[0].URL(), Prefix: p}); err == nil {
				t.Fatalf("prefix %q accepted", p)
			}
		}
	})
}

// TestRedisCorrupt: the corrupt-record contract of storetest.RunCorrupt,
// the record's JSON overwritten behind the store's back.
func TestRedisCorrupt(t *testing.T) {
	r := testenv.StartRedis(t)
	raw := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer raw.Close()
	var prefix string // the subtests' store, one at a time
	storetest.RunCorrupt(t, func(t testing.TB) state.Store {
		s, p := newRedis(t, r.URL())
		prefix = p
		return s
	}, spoilRedis(t, raw, &prefix))
}

// TestRedisListing: a listing walked page by page returns every matching
// operation once when a page's records are left out after its script
// read the index, and while operations change status
// (storetest.RunListing).
func TestRedisListing(t *testing.T) {
	r := testenv.StartRedis(t)
	raw := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer raw.Close()
	var prefix string // the subtests' store, one at a time
	storetest.RunListing(t, func(t testing.TB) state.Store {
		s, p := newRedis(t, r.URL())
		prefix = p
		return s
	}, func(s state.Store, fn func()) { redisstore.SetListGap(s.(*redisstore.Store), fn) }, spoilRedis(t, raw, &prefix))
}

// spoilRedis overwrites a record JSON of the store of key prefix *prefix
// behind its back.
func spoilRedis(t testing.TB, raw *redis.Client, prefix *string) storetest.Spoil {
	return func(ctx context.Context, kind, id string, data []byte) {
		key := *prefix + map[string]string{"mapping": "mapping:", "export": "export:", "operation": "op:"}[kind] + id
		if err := raw.HSet(ctx, key, "j", data).Err(); err != nil {
			t.Fatal(err)
		}
	}
}
