// Command scale measures volumed with a large retained history (make
// bench-scale). It records N terminal operations over VOLUMES volumes and
// VMS VMs through the state store interface (in parallel), measures the
// store's reads in process, then starts a real volumed on that history
// (with a CloudStack simulator beside it) and measures, over HTTP, the
// listings, reads and counts, its resident memory (VmRSS), and its start
// and restart to serving. Every figure is printed beside its goal; nothing
// is asserted.
package main

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/volumed/volumed/bench/internal/proc"
	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
	"github.com/volumed/volumed/stores/storetest"
)

type config struct {
	store    string
	n        int
	volumes  int
	vms      int
	callers  int
	writers  int
	samples  int
	work     string
	volumed  string
	cloudsim string
	redisURL string
	settle   time.Duration
	reads    int
	bare     bool
}

func main() {
	var c config
	flag.StringVar(&c.store, "store", "kv", "kv (embedded) or redis")
	flag.IntVar(&c.n, "n", 1_000_000, "retained terminal operations to record")
	flag.IntVar(&c.volumes, "volumes", 10_000, "volumes they spread over")
	flag.IntVar(&c.vms, "vms", 1_000, "VMs they spread over")
	flag.IntVar(&c.callers, "callers", 20, "distinct requested_by principals")
	flag.IntVar(&c.writers, "writers", 64, "parallel writers while loading")
	flag.IntVar(&c.samples, "samples", 200, "requests per measured figure")
	flag.StringVar(&c.work, "work", "", "work directory (data dir, logs); default a new temporary one, removed after")
	flag.StringVar(&c.volumed, "volumed", "", "volumed binary")
	flag.StringVar(&c.cloudsim, "cloudsim", "", "cloudsim binary (test/cloudsim/cmd/cloudsim)")
	flag.StringVar(&c.redisURL, "redis-url", "", "Redis URL, for -store redis (its database is flushed first)")
	flag.DurationVar(&c.settle, "settle", 150*time.Second, "how long volumed idles before its resident memory is measured again")
	flag.IntVar(&c.reads, "reads", 10_000, "reads by id of random operations after the measured requests, before resident memory is measured again")
	flag.BoolVar(&c.bare, "bare", false, "kv: load the history without the index cache and archive volumed keeps beside it (a data dir an earlier main wrote: volumed's first start reads the whole bucket)")
	flag.Parse()
	if err := run(context.Background(), c); err != nil {
		fmt.Fprintln(os.Stderr, "bench-scale:", err)
		os.Exit(1)
	}
}

// goals of issue 21, by figure.
const (
	goalListMS  = 20.0
	goalGetMS   = 5.0
	goalStartS  = 2.0
	goalRSSMB   = 100.0
	goalStatsMS = 20.0
)

func run(ctx context.Context, c config) error {
	if c.volumed == "" || c.cloudsim == "" {
		return errors.New("-volumed and -cloudsim are required")
	}
	if c.store == "redis" && c.redisURL == "" {
		return errors.New("-store redis needs -redis-url")
	}
	work, done, err := proc.WorkDir(c.work, "bench-scale-")
	if err != nil {
		return err
	}
	defer done()
	c.work = work
	history := "as volumed records it (index cache and archive beside the bucket)"
	if c.bare {
		history = "bare (no index cache or archive: an earlier main's data dir)"
	}
	fmt.Printf("machine: %s; store %s; %d operations over %d volumes, %d VMs, %d callers; history %s\n",
		proc.Machine(), c.store, c.n, c.volumes, c.vms, c.callers, history)
	gen := newGenerator(c)
	data := filepath.Join(c.work, "data")
	if err := gen.loadAndMeasure(ctx, data); err != nil {
		return err
	}
	return gen.serve(ctx, data)
}

// generator makes the i-th operation of the history, the same every run.
type generator struct {
	storetest.History
	c config
}

// newGenerator spreads c's history over the 29 days before now.
func newGenerator(c config) generator {
	return generator{c: c, History: storetest.History{Volumes: c.volumes, VMs: c.vms, Callers: c.callers,
		Start: time.Now().Add(-29 * 24 * time.Hour).Truncate(time.Second), Step: 29 * 24 * time.Hour / time.Duration(c.n)}}
}

// openStore opens the store volumed will use on data (the embedded
// server's files and volumed's account, or Redis).
func (g generator) openStore(ctx context.Context, data string) (state.Store, func(), error) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if g.c.store == "redis" {
		s, err := redisstore.New(ctx, redisstore.Config{URL: g.c.redisURL, Logger: log})
		if err != nil {
			return nil, nil, err
		}
		return s, func() { _ = s.Close(ctx) }, nil
	}
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: data, Logger: log})
	if err := b.Start(ctx); err != nil {
		return nil, nil, err
	}
	cfg := state.KVConfig{Logger: log}
	if !g.c.bare {
		cfg.IndexCache, cfg.Archive = state.KVFiles(data)
	}
	s, err := state.NewKV(ctx, b.JetStream(), cfg)
	if err != nil {
		_ = b.Close(ctx)
		return nil, nil, err
	}
	return s, func() { _ = s.Close(ctx); _ = b.Close(ctx) }, nil
}

// loadAndMeasure records the history through the store, then measures
// the store's own reads in this process.
func (g generator) loadAndMeasure(ctx context.Context, data string) error {
	if g.c.store == "redis" {
		if out, err := exec.Command("redis-cli", "-u", g.c.redisURL, "FLUSHDB").CombinedOutput(); err != nil {
			return fmt.Errorf("flush redis: %v: %s", err, out)
		}
	}
	if err := os.MkdirAll(data, 0o750); err != nil {
		return err
	}
	s, closeStore, err := g.openStore(ctx, data)
	if err != nil {
		return err
	}
	defer closeStore()
	began := time.Now()
	var next, done atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, g.c.writers)
	for range g.c.writers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= g.c.n {
					return
				}
				_, err := s.CreateOperation(ctx, g.Op(i))
				for tries := 1; errors.Is(err, state.ErrUnavailable) && tries < 5; tries++ {
					_, err = s.CreateOperation(ctx, g.Op(i)) // a timeout on a loaded machine: ErrExists if it was written
				}
				if err != nil && !errors.Is(err, state.ErrExists) {
					errc <- fmt.Errorf("create %d: %w", i, err)
					return
				}
				if d := done.Add(1); d%100_000 == 0 {
					fmt.Fprintf(os.Stderr, "  loaded %d in %s\n", d, time.Since(began).Round(time.Second))
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return err
	}
	el := time.Since(began)
	fmt.Printf("loaded %d operations through the store in %s (%.0f/s, %d writers)\n",
		g.c.n, el.Round(time.Second), float64(g.c.n)/el.Seconds(), g.c.writers)

	fmt.Printf("\nstore, in process (p50 / p99 ms over %d requests; goal p99 ≤ %.0f ms for lists, ≤ %.0f ms for a get); load %s\n",
		g.c.samples, goalListMS, goalGetMS, proc.LoadAvg())
	for _, q := range g.queries() {
		for _, deep := range []bool{false, true} {
			fs := g.filters(q, deep)
			ignored := false
			lat, err := g.sample(func(i int, _ *rand.Rand) error {
				ops, _, err := s.ListOperations(ctx, fs[i])
				if err == nil && len(ops) == 0 {
					err = fmt.Errorf("%s: empty page", q.name)
				}
				for _, op := range ops {
					ignored = ignored || (fs[i].RequestedBy != "" && op.RequestedBy != fs[i].RequestedBy)
				}
				return err
			})
			if err != nil {
				return err
			}
			name := "list " + q.name + page(deep)
			if ignored {
				name += " (NOT FILTERED)"
			}
			report(name, lat, goalListMS)
		}
	}
	lat, err := g.sample(func(_ int, r *rand.Rand) error {
		_, err := s.GetOperation(ctx, g.ID(r.IntN(g.c.n)))
		return err
	})
	if err != nil {
		return err
	}
	report("get operation", lat, goalGetMS)
	lat, err = g.sample(func(int, *rand.Rand) error {
		st, err := s.Stats(ctx)
		if err == nil && st.Total != int64(g.c.n) {
			err = fmt.Errorf("stats total %d, want %d", st.Total, g.c.n)
		}
		return err
	})
	if err != nil {
		return err
	}
	report("stats", lat, goalStatsMS)
	return nil
}

func page(deep bool) string {
	if deep {
		return ", deep cursor"
	}
	return ", first page"
}

// query is a filter of the measured listings; filter picks its values.
type query struct {
	name   string
	filter func(r *rand.Rand) state.Filter
}

func (g generator) queries() []query {
	// pick returns a random operation that keep accepts, so that every
	// filter made of its fields selects something.
	pick := func(r *rand.Rand, keep func(commands.Operation) bool) commands.Operation {
		for {
			if op := g.Op(r.IntN(g.c.n)); keep(op) {
				return op
			}
		}
	}
	vmOf := func(op commands.Operation) string { return op.VM() }
	any := func(commands.Operation) bool { return true }
	onVM := func(op commands.Operation) bool { return op.VMID != nil }
	return []query{
		{"type", func(r *rand.Rand) state.Filter { return state.Filter{Type: pick(r, any).Type} }},
		{"status", func(r *rand.Rand) state.Filter {
			return state.Filter{Status: []commands.OpStatus{commands.StatusCompleted, commands.StatusFailed}[r.IntN(2)]}
		}},
		{"volume", func(r *rand.Rand) state.Filter { return state.Filter{VolumeID: pick(r, any).VolumeID} }},
		{"vm", func(r *rand.Rand) state.Filter { return state.Filter{VMID: vmOf(pick(r, onVM))} }},
		{"requested_by", func(r *rand.Rand) state.Filter {
			return state.Filter{RequestedBy: pick(r, any).RequestedBy}
		}},
		{"type+status", func(r *rand.Rand) state.Filter {
			op := pick(r, func(op commands.Operation) bool { return op.Status == commands.StatusFailed })
			return state.Filter{Type: op.Type, Status: op.Status}
		}},
		{"status+volume", func(r *rand.Rand) state.Filter {
			op := pick(r, func(op commands.Operation) bool { return op.Status == commands.StatusCompleted })
			return state.Filter{Status: op.Status, VolumeID: op.VolumeID}
		}},
		{"type+vm", func(r *rand.Rand) state.Filter {
			op := pick(r, onVM)
			return state.Filter{Type: op.Type, VMID: vmOf(op)}
		}},
		{"vm+requested_by", func(r *rand.Rand) state.Filter {
			op := pick(r, onVM)
			return state.Filter{VMID: vmOf(op), RequestedBy: op.RequestedBy}
		}},
	}
}

// deepCursor is the cursor after the newest operation of the older half
// of the history that f selects and that has an older one f selects (the
// bench knows the history, so it makes the cursor the bridge would have
// returned on that page): its page is never empty. A history in which f
// selects one operation has no such cursor: "", the first page.
func (g generator) deepCursor(f state.Filter) string {
	selects := func(op commands.Operation) bool {
		return (f.Type == "" || op.Type == f.Type) && (f.Status == "" || op.Status == f.Status) &&
			(f.VolumeID == "" || op.VolumeID == f.VolumeID) && (f.VMID == "" || op.VM() == f.VMID) &&
			(f.RequestedBy == "" || op.RequestedBy == f.RequestedBy)
	}
	// The two newest selected at or below the middle, else the oldest
	// above it: the newer of the two is the cursor.
	var found []commands.Operation
	for i := g.c.n / 2; i >= 0 && len(found) < 2; i-- {
		if op := g.Op(i); selects(op) {
			found = append(found, op)
		}
	}
	for i := g.c.n/2 + 1; i < g.c.n && len(found) < 2; i++ {
		if op := g.Op(i); selects(op) {
			found = append(found, op)
		}
	}
	if len(found) < 2 {
		return ""
	}
	op := found[0]
	if found[1].CreatedAt.After(op.CreatedAt) {
		op = found[1]
	}
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(op.CreatedAt.UnixMicro(), 10) + ":" + op.ID))
}

// warmups is how many runs of a measured request precede the timed ones.
const warmups = 5

// filters makes the filters of the runs of a listing (warm-up ones
// first), with the first page's limit and the deep cursor if asked, so
// that making them is not timed.
func (g generator) filters(q query, deep bool) []state.Filter {
	r := rand.New(rand.NewPCG(3, 4))
	out := make([]state.Filter, warmups+g.c.samples)
	for i := range out {
		out[i] = q.filter(r)
		out[i].Limit = commands.DefaultListLimit
		if deep {
			out[i].Cursor = g.deepCursor(out[i])
		}
	}
	return out
}

// result is the latencies of a measured request, sorted, and how many
// of its runs failed with the store unavailable (a timeout: counted with
// its latency, not fatal), with the first such error.
type result struct {
	lat    []time.Duration
	failed int
	first  error
}

// sample runs fn (with the run's number) samples times, after a few
// warm-up runs. An error other than the store being unavailable (an
// empty page, a wrong answer) stops the bench.
func (g generator) sample(fn func(i int, r *rand.Rand) error) (result, error) {
	r := rand.New(rand.NewPCG(1, 2))
	var res result
	for i := range warmups + g.c.samples {
		t := time.Now()
		err := fn(i, r)
		el := time.Since(t)
		if err != nil && !errors.Is(err, state.ErrUnavailable) && !strings.Contains(err.Error(), ": 503 ") {
			return res, err
		}
		if i < warmups {
			continue
		}
		if err != nil {
			if res.failed++; res.first == nil {
				res.first = err
			}
		}
		res.lat = append(res.lat, el)
	}
	slices.Sort(res.lat)
	return res, nil
}

func report(name string, res result, goal float64) {
	p99 := proc.Pct(res.lat, 0.99)
	fmt.Printf("  %-44s %8.2f %8.2f   goal ≤ %4.0f ms  %s\n", name, proc.Pct(res.lat, 0.5), p99, goal, proc.Verdict(p99 <= goal && res.failed == 0))
	if res.failed > 0 {
		fmt.Printf("    %d of %d failed, first: %v\n", res.failed, len(res.lat), res.first)
	}
}

// serve starts volumed on the history, measures it, restarts it and
// measures again.
func (g generator) serve(ctx context.Context, data string) error {
	ports := proc.FreePorts(3)
	simPort, natsPort, apiPort := ports[0], ports[1], ports[2]
	simDir := filepath.Join(g.c.work, "cloudsim")
	sim := exec.Command(g.c.cloudsim, "--listen", "127.0.0.1:"+simPort, "--state-dir", simDir, "--log-level", "warn")
	simLog, err := os.Create(filepath.Join(g.c.work, "cloudsim.log"))
	if err != nil {
		return err
	}
	sim.Stdout, sim.Stderr = simLog, simLog
	if err := sim.Start(); err != nil {
		return err
	}
	defer proc.Stop(sim)
	if err := proc.WaitHTTP(ctx, "http://127.0.0.1:"+simPort+"/_sim/stats", "", 30*time.Second); err != nil {
		return err
	}
	natsConf := filepath.Join(g.c.work, "nats.conf")
	if err := os.WriteFile(natsConf, []byte("listen: 127.0.0.1:"+natsPort+"\njetstream {}\n"), 0o600); err != nil {
		return err
	}
	args := []string{"--cloudstack-url", "http://127.0.0.1:" + simPort + "/client/api",
		"--cloudstack-api-key", "cloudsim-api-key", "--cloudstack-secret-key", "cloudsim-secret-key",
		"--vm-id", "87654321-4321-4321-4321-210987654321", "--listen", "127.0.0.1:" + apiPort,
		"--data-dir", data, "--nats-config", natsConf, "--nbd-listen", "", "--device-agent=false",
		"--sync-interval", "0", "--log-level", "info"}
	if g.c.store == "redis" {
		args = append(args, "--redis-url", g.c.redisURL)
	}
	api := "http://127.0.0.1:" + apiPort + "/api/v1"
	fmt.Printf("\nvolumed over HTTP (p50 / p99 ms over %d requests); load %s\n", g.c.samples, proc.LoadAvg())
	for round, name := range []string{"start", "restart"} {
		vd, up, err := g.startVolumed(ctx, args, api, data, round)
		if err != nil {
			return err
		}
		token, err := os.ReadFile(filepath.Join(data, "api-token"))
		if err != nil {
			proc.Stop(vd)
			return err
		}
		cl := client{api: api, token: strings.TrimSpace(string(token))}
		fmt.Printf("  %-44s %8.2f s             goal ≤ %4.0f s   %s\n", name+" to serving (health and a list)", up.Seconds(),
			goalStartS, proc.Verdict(up.Seconds() <= goalStartS))
		rss := func(when string) {
			mb := proc.RSSMB(vd.Process.Pid)
			fmt.Printf("  %-44s %8.1f MB            goal ≤ %4.0f MB  %s\n", "resident (VmRSS) "+when, mb, goalRSSMB, proc.Verdict(mb <= goalRSSMB))
		}
		rss("after " + name)
		// What the process holds once idle, not the garbage of its start
		// (Go collects at least every two minutes, then gives memory back).
		time.Sleep(g.c.settle)
		rss(fmt.Sprintf("%s idle after %s", g.c.settle, name))
		if round == 0 {
			if err := g.measureHTTP(ctx, cl); err != nil {
				proc.Stop(vd)
				return err
			}
			rss("after the requests")
			if err := g.readMany(ctx, cl); err != nil {
				proc.Stop(vd)
				return err
			}
			rss(fmt.Sprintf("after %d reads by id", g.c.reads))
		}
		proc.Stop(vd)
	}
	return nil
}

// startVolumed starts volumed and returns how long until /health
// answered 200 and a list of operations answered.
func (g generator) startVolumed(ctx context.Context, args []string, api, data string, round int) (*exec.Cmd, time.Duration, error) {
	log, err := os.Create(filepath.Join(g.c.work, fmt.Sprintf("volumed-%d.log", round)))
	if err != nil {
		return nil, 0, err
	}
	vd := exec.Command(g.c.volumed, args...)
	vd.Stdout, vd.Stderr = log, log
	began := time.Now()
	if err := vd.Start(); err != nil {
		return nil, 0, err
	}
	if err := proc.WaitHTTP(ctx, api+"/health", "", 10*time.Minute); err != nil {
		proc.Stop(vd)
		return nil, 0, err
	}
	token, err := os.ReadFile(filepath.Join(data, "api-token"))
	if err != nil {
		proc.Stop(vd)
		return nil, 0, err
	}
	if err := proc.WaitHTTP(ctx, api+"/operations?limit=1", strings.TrimSpace(string(token)), time.Minute); err != nil {
		proc.Stop(vd)
		return nil, 0, err
	}
	return vd, time.Since(began), nil
}

// measureHTTP measures the listings, reads and counts through the REST
// API.
func (g generator) measureHTTP(ctx context.Context, cl client) error {
	for _, q := range g.queries() {
		for _, deep := range []bool{false, true} {
			fs := g.filters(q, deep)
			lat, err := g.sample(func(i int, _ *rand.Rand) error {
				f := fs[i]
				v := url.Values{}
				for k, val := range map[string]string{"type": string(f.Type), "status": string(f.Status),
					"volume_id": f.VolumeID, "vm_id": f.VMID, "requested_by": f.RequestedBy} {
					if val != "" {
						v.Set(k, val)
					}
				}
				if f.Cursor != "" {
					v.Set("cursor", f.Cursor)
				}
				return cl.get(ctx, "/operations?"+v.Encode())
			})
			if err != nil {
				return err
			}
			report("GET /operations "+q.name+page(deep), lat, goalListMS)
		}
	}
	for _, tc := range []struct{ name, query string }{{"GET /operations/{id}", ""}, {"GET /operations/{id}?wait=10s", "?wait=10s"}} {
		lat, err := g.sample(func(_ int, r *rand.Rand) error {
			return cl.get(ctx, "/operations/"+g.ID(r.IntN(g.c.n))+tc.query)
		})
		if err != nil {
			return err
		}
		report(tc.name, lat, goalGetMS)
	}
	for _, path := range []string{"/metrics", "/../../metrics"} {
		name := "GET /api/v1/metrics"
		if path != "/metrics" {
			name = "GET /metrics (Prometheus)"
		}
		lat, err := g.sample(func(int, *rand.Rand) error { return cl.get(ctx, path) })
		if err != nil {
			return err
		}
		report(name, lat, goalStatsMS)
	}
	return nil
}

// readMany reads g.c.reads random operations by id, 8 at once: records
// of every age, so every part of the history is read again.
func (g generator) readMany(ctx context.Context, cl client) error {
	ids := make(chan string)
	errs := make(chan error, 8)
	for range 8 {
		go func() {
			var first error
			for id := range ids {
				if err := cl.get(ctx, "/operations/"+id); err != nil && first == nil {
					first = err
				}
			}
			errs <- first
		}()
	}
	r := rand.New(rand.NewPCG(3, 4))
	for range g.c.reads {
		ids <- g.ID(r.IntN(g.c.n))
	}
	close(ids)
	var err error
	for range 8 {
		err = cmp.Or(err, <-errs)
	}
	return err
}

type client struct {
	api, token string
}

var httpClient = &http.Client{Timeout: 30 * time.Second}

func (c client) get(ctx context.Context, path string) error {
	u := c.api + path
	if strings.HasPrefix(path, "/../../") {
		u = strings.TrimSuffix(c.api, "/api/v1") + strings.TrimPrefix(path, "/../..")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %d %s", path, resp.StatusCode, body)
	}
	if strings.HasPrefix(path, "/operations?") && strings.TrimSpace(string(body)) == "[]" {
		return fmt.Errorf("GET %s: empty page", path)
	}
	return nil
}
