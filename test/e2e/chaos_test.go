package e2e_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// The chaos soak's knobs: CHAOS_SEED replays a run (the seed is printed),
// CHAOS_SECONDS sets how long the faults last and selects the long mode,
// whose pauses outlast the ack-wait.
const (
	chaosSlots          = 4               // volumes worked on at once, one client each
	chaosDefaultSeconds = 60              // faults in the short run (make test)
	chaosAckWait        = 2 * time.Second // the harness's --ack-wait
	chaosClientTimeout  = 5 * time.Second // a client's patience with one instance
)

// chaosAction is one kind of fault the driver injects.
type chaosAction int

const (
	actKill    chaosAction = iota // kill -9 an instance, restart it later
	actStop                       // SIGSTOP an instance, SIGCONT it later
	actLost                       // CloudStack runs calls, their answers are lost
	actDrop                       // CloudStack drops connections before running calls
	act530                        // CloudStack answers 530
	actLatency                    // CloudStack answers late
	actJobFail                    // attach and detach jobs fail
	actOutage                     // CloudStack answers nothing
	actionKinds
)

var actionNames = [...]string{"kill -9", "SIGSTOP", "lost replies", "dropped connections", "530s", "latency",
	"failed jobs", "outage"}

// chaosOp is one operation a client had accepted.
type chaosOp struct {
	key    string
	id     string
	typ    commands.OpType
	slot   int
	volume string // "" for a create until it completed
	final  commands.Operation
}

// chaos is the soak's shared state.
type chaos struct {
	t         *testing.T
	seed      uint64
	ds        []*daemon
	sim       *simProcess
	cs        *csapi.Client
	hc        *http.Client
	creds     string // NATS credentials directory
	natsURL   string
	stop      chan struct{} // closed when the clients must stop submitting
	mu        sync.Mutex
	ops       []*chaosOp        // in acceptance order
	byKey     map[string]string // Idempotency-Key → operation id answered
	rejected  []string          // "key: status" of commands refused (404, 409): nothing recorded
	retries   int               // submissions sent again with the same key
	resubmits int               // accepted commands sent again with their key
	down      []bool            // instance i killed or stopped now
	history   []string          // logs of instances' earlier runs
}

// chaosSettings reads CHAOS_SEED and CHAOS_SECONDS.
func chaosSettings(t *testing.T) (seed uint64, d time.Duration, long bool) {
	seed = rand.Uint64()
	if s := os.Getenv("CHAOS_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED=%q: %v", s, err)
		}
		seed = n
	}
	secs := chaosDefaultSeconds
	if s := os.Getenv("CHAOS_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("CHAOS_SECONDS=%q: want a positive number", s)
		}
		secs, long = n, true
	}
	return seed, time.Duration(secs) * time.Second, long
}

// TestChaos is the chaos soak: three volumed on one NATS cluster, the
// simulator as its own process, clients creating, attaching, detaching and
// deleting a handful of volumes and retrying with the same Idempotency-Key
// on another instance, while a seeded driver kills (-9) and pauses
// (SIGSTOP) instances and makes CloudStack lose answers, drop
// connections, answer 530, answer late, fail jobs and go away. When the
// faults stop and everything settled, it checks every invariant, before
// any reconcile (the periodic one is off): every accepted operation is
// terminal; CloudStack did exactly what the completed operations say, and
// has no volume they do not account for; operations on a volume ran one
// after another in acceptance order; every instance's mappings and
// GET /volumes/{id} agree with CloudStack; one operation per key.
func TestChaos(t *testing.T) {
	seed, length, long := chaosSettings(t)
	t.Logf("chaos seed %d, %v of faults (replay: make chaos SEED=%d SECONDS=%d)", seed, length, seed, int(length.Seconds()))
	fmt.Fprintf(os.Stderr, "TestChaos: seed %d, %v of faults\n", seed, length)
	rng := rand.New(rand.NewPCG(seed, 0))

	sim := startSimProcess(t, "--seed", strconv.FormatUint(seed, 10))
	nc := startNATSCluster(t, 3)
	c := &chaos{t: t, seed: seed, sim: sim, hc: &http.Client{Timeout: chaosClientTimeout, Transport: validating{t: t, rt: http.DefaultTransport}},
		cs:    csapi.New(csapi.Config{URL: sim.URL(), APIKey: cloudsim.DefaultAPIKey, SecretKey: cloudsim.DefaultSecretKey}),
		creds: nc.creds, natsURL: nc.url(), stop: make(chan struct{}), byKey: map[string]string{}, down: make([]bool, 3)}
	for range 3 {
		c.ds = append(c.ds, startDaemon(t, sim, daemonOpts{natsURL: nc.url(), natsCreds: nc.creds,
			extra: []string{"--device-agent=false", "--sync-interval", "0"}}))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("chaos seed %d failed; earlier runs of restarted instances:\n%s", seed, strings.Join(c.history, "\n"))
			for i, d := range c.ds {
				t.Logf("log of instance %d:\n%s", i, d.out.String())
			}
		}
	})

	var clients sync.WaitGroup
	for slot := range chaosSlots {
		clients.Go(func() { c.client(slot, rand.New(rand.NewPCG(seed, uint64(slot)+1))) })
	}
	counts := c.drive(rng, length, long)
	close(c.stop)
	clients.Wait() // each ends its submission, and waits no more
	c.settle()
	t.Logf("faults injected: %s", counts)
	c.check()
}

// drive injects faults until length has passed: the first steps cover
// every kind once, in a seeded order, then kinds are drawn at random. A
// step may pause or kill an instance while CloudStack misbehaves. It
// returns how many of each kind it injected.
func (c *chaos) drive(rng *rand.Rand, length time.Duration, long bool) string {
	order := rng.Perm(int(actionKinds))
	var done [actionKinds]int
	end := time.Now().Add(length)
	for step := 0; time.Now().Before(end) || step < int(actionKinds); step++ {
		a := chaosAction(rng.IntN(int(actionKinds)))
		if step < len(order) {
			a = chaosAction(order[step])
		}
		done[a]++
		hold := time.Duration(1000+rng.IntN(3000)) * time.Millisecond
		var f cloudsim.Faults
		calls := []string{"createVolume", "attachVolume", "detachVolume", "deleteVolume", "listVolumes", "queryAsyncJobResult"}
		fault := func(kind string, rate float64) {
			f.Errors = map[string]cloudsim.ErrorFault{}
			for _, cmd := range calls {
				f.Errors[cmd] = cloudsim.ErrorFault{Rate: rate, Kind: kind}
			}
		}
		switch a {
		case actLost:
			fault(cloudsim.ErrorKindDropAfter, 0.2+0.3*rng.Float64())
		case actDrop:
			fault(cloudsim.ErrorKindDrop, 0.2+0.3*rng.Float64())
		case act530:
			fault(cloudsim.ErrorKind530, 0.2+0.2*rng.Float64())
		case actLatency:
			f.Latency = map[string]cloudsim.Duration{cloudsim.AllCommands: cloudsim.Duration(time.Duration(100+rng.IntN(700)) * time.Millisecond)}
		case actJobFail:
			// Not createVolume: a create whose job fails leaves its volume
			// in CloudStack by design (README), which the check would
			// count as an orphan.
			f.JobFailureRate = map[string]float64{"attachVolume": 0.3, "detachVolume": 0.3}
		case actStop:
			// Long jobs, so that the paused instance is likely polling one.
			d := cloudsim.Duration(time.Duration(500+rng.IntN(1500)) * time.Millisecond)
			f.JobDuration = map[string]cloudsim.Duration{"attachVolume": d, "detachVolume": d}
		case actOutage:
			f.Outage = true
			hold = time.Duration(1000+rng.IntN(2000)) * time.Millisecond
		}
		c.t.Logf("chaos step %d: %s for %v", step, actionNames[a], hold)
		c.sim.setFaults(f)
		switch a {
		case actKill:
			c.kill(rng, hold)
		case actStop:
			pause := time.Duration(200+rng.IntN(int(chaosAckWait/2/time.Millisecond)-200)) * time.Millisecond
			if long {
				pause = time.Duration(500+rng.IntN(int(3*chaosAckWait/time.Millisecond))) * time.Millisecond
			}
			time.Sleep(time.Second) // jobs start under the long durations
			c.pause(rng, pause)
		default:
			time.Sleep(hold)
		}
		c.sim.setFaults(cloudsim.Faults{})
		time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond) // a breath between faults
	}
	var parts []string
	for a, n := range done {
		parts = append(parts, fmt.Sprintf("%s ×%d", actionNames[a], n))
	}
	return strings.Join(parts, ", ")
}

// victim picks an instance that is up.
func (c *chaos) victim(rng *rand.Rand) int {
	for {
		if i := rng.IntN(len(c.ds)); !c.isDown(i) {
			return i
		}
	}
}

func (c *chaos) isDown(i int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.down[i]
}

func (c *chaos) setDown(i int, down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down[i] = down
}

// kill kills an instance with SIGKILL and restarts it on its data after
// hold, waiting until it is healthy.
func (c *chaos) kill(rng *rand.Rand, hold time.Duration) {
	i := c.victim(rng)
	d := c.ds[i]
	c.setDown(i, true)
	d.kill9()
	c.t.Logf("instance %d killed", i)
	time.Sleep(hold)
	c.mu.Lock()
	c.history = append(c.history, fmt.Sprintf("--- instance %d, killed at %s:\n%s", i, time.Now().Format(time.StampMilli), d.out.String()))
	c.mu.Unlock()
	d.launch()
	d.awaitHealthy(90 * time.Second)
	c.setDown(i, false)
	c.t.Logf("instance %d restarted", i)
}

// pause stops an instance with SIGSTOP for a while, then resumes it.
func (c *chaos) pause(rng *rand.Rand, pause time.Duration) {
	i := c.victim(rng)
	c.setDown(i, true)
	_ = c.ds[i].cmd.Process.Signal(syscall.SIGSTOP)
	c.t.Logf("instance %d stopped for %v", i, pause)
	time.Sleep(pause)
	_ = c.ds[i].cmd.Process.Signal(syscall.SIGCONT)
	c.setDown(i, false)
}

// stopped reports whether the clients must stop submitting.
func (c *chaos) stopped() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// request sends one REST request to instance i with an Idempotency-Key
// ("" for none); err is a transport error or timeout.
func (c *chaos) request(i int, method, path string, body any, key string) (int, []byte, error) {
	return c.requestCtx(context.Background(), i, method, path, body, key)
}

// requestCtx is request under ctx.
func (c *chaos) requestCtx(ctx context.Context, i int, method, path string, body any, key string) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.ds[i].api+path, rd)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return resp.StatusCode, data, err
}

// submit sends a command with key until an instance accepts it (201),
// each retry on another instance than the last, and records it; nil when
// it is refused with 409 or not accepted in time. A third of the first
// attempts hang up after 10–120 ms, often after the instance recorded the
// command: the answer is lost, and the retry must find the same operation.
func (c *chaos) submit(rng *rand.Rand, slot int, typ commands.OpType, method, path string, body any, key string) *chaosOp {
	deadline := time.Now().Add(90 * time.Second)
	last := -1
	for n := 0; ; n++ {
		i := rng.IntN(len(c.ds))
		if i == last {
			i = (i + 1) % len(c.ds)
		}
		last = i
		if n > 0 {
			c.mu.Lock()
			c.retries++
			c.mu.Unlock()
		}
		ctx, cancel := context.WithCancel(context.Background())
		if n == 0 && rng.IntN(3) == 0 {
			ctx, cancel = context.WithTimeout(ctx, time.Duration(10+rng.IntN(110))*time.Millisecond)
		}
		status, data, err := c.requestCtx(ctx, i, method, path, body, key)
		cancel()
		switch {
		case err == nil && status == http.StatusCreated:
			var op commands.Operation
			if err := json.Unmarshal(data, &op); err != nil {
				c.t.Errorf("%s %s: %v: %s", method, path, err, data)
				return nil
			}
			c.mu.Lock()
			c.byKey[key] = op.ID
			o := &chaosOp{key: key, id: op.ID, typ: typ, slot: slot, volume: op.VolumeID}
			c.ops = append(c.ops, o)
			c.mu.Unlock()
			if rng.IntN(5) == 0 { // a client that doubts its answer asks another instance
				c.resubmit(o, (i+1+rng.IntN(len(c.ds)-1))%len(c.ds), method, path, body)
			}
			return o
		case err == nil && (status == http.StatusConflict && typ == commands.OpDelete ||
			status == http.StatusNotFound && typ != commands.OpCreate):
			// A delete of a volume still attached (a detach failed), or a
			// command on a volume CloudStack no longer has (a delete that
			// failed but took effect): nothing may be recorded, which
			// check verifies; the client goes on with a new volume.
			c.mu.Lock()
			c.rejected = append(c.rejected, fmt.Sprintf("%s: %d", key, status))
			c.mu.Unlock()
			c.t.Logf("%s %s (key %s): %d %s", method, path, key, status, data)
			return nil
		case err == nil && status != http.StatusServiceUnavailable:
			c.t.Errorf("%s %s (key %s) on instance %d: %d %s", method, path, key, i, status, data)
			return nil
		case time.Now().After(deadline):
			c.t.Errorf("%s %s (key %s) not accepted within 90s: %d %v", method, path, key, status, err)
			return nil
		}
		time.Sleep(time.Duration(50+rng.IntN(200)) * time.Millisecond)
	}
}

// resubmit sends an accepted command again, with its key, to instance i:
// a 201 must name the same operation.
func (c *chaos) resubmit(op *chaosOp, i int, method, path string, body any) {
	status, data, err := c.request(i, method, path, body, op.key)
	var again commands.Operation
	if err == nil && status == http.StatusCreated && json.Unmarshal(data, &again) == nil && again.ID != op.id {
		c.t.Errorf("invariant: key %s answered operation %s, then %s on instance %d", op.key, op.id, again.ID, i)
	}
	c.mu.Lock()
	c.resubmits++
	c.mu.Unlock()
}

// await polls an operation on random instances until it is terminal, or
// until the clients must stop and settle has had its time.
func (c *chaos) await(rng *rand.Rand, op *chaosOp) (commands.Operation, bool) {
	for {
		var cur commands.Operation
		status, data, err := c.request(rng.IntN(len(c.ds)), http.MethodGet, "/operations/"+op.id+"?wait=2s", nil, "")
		if err == nil && status == http.StatusOK && json.Unmarshal(data, &cur) == nil && cur.Status.Terminal() {
			return cur, true
		}
		if c.stopped() {
			return cur, false // settle waits for the rest
		}
		if err == nil && status != http.StatusOK && status != http.StatusServiceUnavailable {
			c.t.Errorf("GET /operations/%s: %d %s", op.id, status, data)
			return cur, false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// client works on one volume at a time: it creates one, runs bursts of
// attaches and detaches on it (each burst queued at once, in order), then
// detaches and deletes it, and starts over until the faults stop.
func (c *chaos) client(slot int, rng *rand.Rand) {
	n := 0
	key := func() string { n++; return fmt.Sprintf("chaos-%d-%d-%d", c.seed, slot, n) }
	attach := map[string]string{"vm_id": cloudsim.RemoteVMID}
	for gen := 0; !c.stopped(); gen++ {
		name := fmt.Sprintf("chaos-%d-%d-%d", c.seed, slot, gen)
		op := c.submit(rng, slot, commands.OpCreate, http.MethodPost, "/volumes", map[string]any{"name": name,
			"size": 1 << 30, "disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID}, key())
		if op == nil {
			continue
		}
		done, ok := c.await(rng, op)
		if !ok || done.Status != commands.StatusCompleted {
			continue
		}
		vol := done.VolumeID
		c.mu.Lock()
		op.volume = vol
		c.mu.Unlock()
		if !c.work(rng, slot, vol, key, attach) {
			continue
		}
		for try := 0; try < 3 && !c.stopped(); try++ {
			det := c.submit(rng, slot, commands.OpDetach, http.MethodPost, "/volumes/"+vol+"/detach", nil, key())
			if det == nil {
				break
			}
			if _, ok := c.await(rng, det); !ok {
				break
			}
			del := c.submit(rng, slot, commands.OpDelete, http.MethodDelete, "/volumes/"+vol, nil, key())
			if del == nil {
				continue // refused: still attached
			}
			d, ok := c.await(rng, del)
			if !ok || d.Status == commands.StatusCompleted {
				break
			}
		}
	}
}

// work runs two to five bursts of attaches and detaches on vol; false if
// one was refused or the faults ended. After each burst, with nothing
// left running on the volume, it waits up to a second and checks that
// every instance that answers shows the mapping the completed operations
// leave: a late write of a paused executor would show here, mid-run.
func (c *chaos) work(rng *rand.Rand, slot int, vol string, key func() string, attach any) bool {
	attached := false
	for range 2 + rng.IntN(4) {
		if c.stopped() {
			return false
		}
		var burst []*chaosOp
		for range 1 + rng.IntN(3) {
			if rng.IntN(2) == 0 {
				burst = append(burst, c.submit(rng, slot, commands.OpAttach, http.MethodPost, "/volumes/"+vol+"/attach", attach, key()))
			} else {
				burst = append(burst, c.submit(rng, slot, commands.OpDetach, http.MethodPost, "/volumes/"+vol+"/detach", nil, key()))
			}
		}
		var last string
		for _, op := range burst {
			if op == nil {
				return false
			}
			done, ok := c.await(rng, op)
			if !ok {
				return false
			}
			if done.Status == commands.StatusCompleted {
				attached = op.typ == commands.OpAttach
			}
			last = op.id
		}
		time.Sleep(time.Duration(rng.IntN(1000)) * time.Millisecond)
		c.checkMapping(vol, attached, last)
	}
	return true
}

// checkMapping asks every instance for vol's mapping: it must exist
// exactly when the completed operations leave vol attached. Instances
// that do not answer 200 or 404 (paused, killed, starting) are skipped.
func (c *chaos) checkMapping(vol string, attached bool, after string) {
	for i := range c.ds {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		status, data, err := c.requestCtx(ctx, i, http.MethodGet, "/volumes/"+vol+"/device", nil, "")
		cancel()
		switch {
		case err != nil:
		case status == http.StatusOK && !attached:
			c.t.Errorf("invariant (mid-run): instance %d: volume %s has a mapping after %s left it detached: %s", i, vol, after, data)
		case status == http.StatusNotFound && attached:
			c.t.Errorf("invariant (mid-run): instance %d: volume %s has no mapping after %s left it attached", i, vol, after)
		}
	}
}

// settle ends the faults (every instance up and healthy, CloudStack
// well), then waits until every accepted operation is terminal and
// CloudStack runs no job.
func (c *chaos) settle() {
	c.t.Helper()
	c.sim.setFaults(cloudsim.Faults{})
	for _, d := range c.ds {
		d.awaitHealthy(90 * time.Second)
	}
	began := time.Now()
	c.mu.Lock()
	ops := slices.Clone(c.ops)
	c.mu.Unlock()
	deadline := time.Now().Add(3 * time.Minute)
	for n, op := range ops {
		for try := 0; ; try++ {
			var cur commands.Operation
			status, data, err := c.request((n+try)%len(c.ds), http.MethodGet, "/operations/"+op.id+"?wait=5s", nil, "")
			if err == nil && status == http.StatusOK && json.Unmarshal(data, &cur) == nil && cur.Status.Terminal() {
				c.mu.Lock()
				op.final = cur
				if op.typ == commands.OpCreate && cur.Status == commands.StatusCompleted {
					op.volume = cur.VolumeID
				}
				c.mu.Unlock()
				break
			}
			if time.Now().After(deadline) {
				c.t.Errorf("invariant: operation %s (%s, key %s) not terminal 3 minutes after the faults: %s %s",
					op.id, op.typ, op.key, cur.Status, data)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	testenv.Eventually(c.t, time.Minute, func() bool { return c.sim.stats().PendingJobs == 0 }, "CloudStack jobs finished")
	c.t.Logf("settled in %v: %d operations accepted, %d submissions retried with their key, %d accepted ones sent again, %d refused",
		time.Since(began).Round(time.Millisecond), len(ops), c.retries, c.resubmits, len(c.rejected))
}

// volumeModel is what the completed operations on one volume made of it.
type volumeModel struct {
	id       string
	ops      []*chaosOp // in acceptance order, the create first
	exists   bool
	vm       string
	attaches int64
	detaches int64
}

// check checks every invariant.
func (c *chaos) check() {
	t := c.t
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c.mu.Lock()
	defer c.mu.Unlock()

	// The model: each volume's operations in acceptance order, applied.
	volumes := map[string]*volumeModel{}
	var order []string
	statuses := map[string]int{}
	for _, op := range c.ops {
		statuses[string(op.typ)+" "+string(op.final.Status)]++
		if op.volume == "" {
			continue
		}
		m := volumes[op.volume]
		if m == nil {
			m = &volumeModel{id: op.volume}
			volumes[op.volume] = m
			order = append(order, op.volume)
		}
		m.ops = append(m.ops, op)
	}
	t.Logf("operations by type and end: %v", statuses)
	failures := map[string]int{}
	for _, op := range c.ops {
		if op.final.Status == commands.StatusFailed {
			e := op.final.Error
			if i := strings.IndexAny(e, "0123456789"); i > 40 {
				e = e[:i] // ids and numbers vary
			}
			failures[string(op.typ)+": "+e]++
		}
	}
	t.Logf("failures: %v", failures)
	for _, id := range order {
		m := volumes[id]
		for _, op := range m.ops {
			if op.final.Status != commands.StatusCompleted {
				continue
			}
			switch op.typ {
			case commands.OpCreate:
				m.exists = true
			case commands.OpAttach:
				if m.vm == "" {
					m.vm, m.attaches = cloudsim.RemoteVMID, m.attaches+1
				}
			case commands.OpDetach:
				if m.vm != "" {
					m.vm, m.detaches = "", m.detaches+1
				}
			case commands.OpDelete:
				if m.vm != "" {
					t.Errorf("invariant: delete %s of volume %s completed while its attach stood", op.id, id)
				}
				m.exists = false
			}
		}
	}

	// CloudStack's effects are exactly the model's; no orphan volume.
	listed, err := c.cs.ListVolumes(ctx, csapi.ListFilter{})
	if err != nil {
		t.Fatalf("listVolumes: %v", err)
	}
	inCloud := map[string]csapi.Volume{}
	for _, v := range listed {
		if v.Type == "ROOT" {
			continue
		}
		inCloud[v.ID] = v
		if _, ok := volumes[v.ID]; !ok {
			t.Errorf("invariant: orphan volume %s (%s) in CloudStack: no completed create made it", v.ID, v.Name)
		}
	}
	st := c.sim.stats()
	for _, id := range order {
		m := volumes[id]
		v, ok := inCloud[id]
		switch {
		case ok != m.exists:
			t.Errorf("invariant: volume %s exists in CloudStack %v, the completed operations say %v (%s)", id, ok, m.exists, m.story())
		case ok && v.VMID != m.vm:
			t.Errorf("invariant: volume %s attached to %q in CloudStack, the completed operations say %q (%s)", id, v.VMID, m.vm, m.story())
		}
		if st.AttachesSucceeded[id] != m.attaches || st.DetachesSucceeded[id] != m.detaches {
			t.Errorf("invariant: volume %s: CloudStack did %d attaches and %d detaches, the completed operations %d and %d (%s)",
				id, st.AttachesSucceeded[id], st.DetachesSucceeded[id], m.attaches, m.detaches, m.story())
		}
	}

	// Per-volume order: accepted one after another, each ran only after
	// the one before ended.
	started := c.firstExecuting(ctx)
	for _, id := range order {
		ops := volumes[id].ops
		for k := 1; k < len(ops); k++ {
			prev, cur := ops[k-1].final, ops[k].final
			if prev.ID == "" || cur.ID == "" {
				continue // not terminal: reported above
			}
			if !cur.CreatedAt.After(prev.CreatedAt) {
				t.Errorf("invariant: volume %s: %s accepted after %s but created_at %v ≤ %v", id, cur.ID, prev.ID, cur.CreatedAt, prev.CreatedAt)
			}
			if prev.CompletedAt == nil || cur.CompletedAt == nil {
				continue
			}
			if cur.CompletedAt.Before(*prev.CompletedAt) {
				t.Errorf("invariant: volume %s: %s completed at %v, before %s accepted before it (%v)", id, cur.ID, cur.CompletedAt, prev.ID, prev.CompletedAt)
			}
			if s, ok := started[cur.ID]; ok && s.Before(*prev.CompletedAt) {
				t.Errorf("invariant: volume %s: %s started executing at %v, before %s ended at %v", id, cur.ID, s, prev.ID, prev.CompletedAt)
			}
		}
	}

	// Every instance agrees with CloudStack, before any reconcile.
	for i := range c.ds {
		for _, id := range order {
			m := volumes[id]
			var vs commands.VolumeStatus
			status, data, err := c.request(i, http.MethodGet, "/volumes/"+id, nil, "")
			switch {
			case err != nil:
				t.Errorf("instance %d: GET /volumes/%s: %v", i, id, err)
			case !m.exists && status != http.StatusNotFound:
				t.Errorf("invariant: instance %d: GET /volumes/%s of a deleted volume: %d %s", i, id, status, data)
			case m.exists && (status != http.StatusOK || json.Unmarshal(data, &vs) != nil):
				t.Errorf("invariant: instance %d: GET /volumes/%s: %d %s", i, id, status, data)
			case m.exists && ptrValue(vs.VMID) != m.vm:
				t.Errorf("invariant: instance %d: GET /volumes/%s says attached to %q, CloudStack %q", i, id, ptrValue(vs.VMID), m.vm)
			case m.exists && (vs.LastOperation == nil || vs.LastOperation.ID != m.ops[len(m.ops)-1].id):
				t.Errorf("invariant: instance %d: GET /volumes/%s last operation %+v, want %s", i, id, vs.LastOperation, m.ops[len(m.ops)-1].id)
			}
			var mp commands.Mapping
			status, data, err = c.request(i, http.MethodGet, "/volumes/"+id+"/device", nil, "")
			switch {
			case err != nil:
				t.Errorf("instance %d: GET /volumes/%s/device: %v", i, id, err)
			case m.vm == "" && status != http.StatusNotFound:
				t.Errorf("invariant: instance %d: volume %s is not attached in CloudStack, but its mapping answers %d %s (%s)", i, id, status, data, m.story())
			case m.vm != "" && (status != http.StatusOK || json.Unmarshal(data, &mp) != nil || mp.VMID != m.vm):
				t.Errorf("invariant: instance %d: volume %s is attached to %s in CloudStack, but its mapping answers %d %s (%s)", i, id, m.vm, status, data, m.story())
			}
		}
	}

	// One operation per key: the store holds exactly the accepted ones.
	ids := map[string]bool{}
	for _, id := range c.byKey {
		if ids[id] {
			t.Errorf("invariant: operation %s answered for two keys", id)
		}
		ids[id] = true
	}
	stored := c.listOperations()
	for _, op := range stored {
		if !ids[op.ID] {
			t.Errorf("invariant: operation %s (%s on %s, %s) is in the store, but no key was answered with it; refused keys: %v",
				op.ID, op.Type, op.VolumeID, op.Status, c.rejected)
		}
	}
	if len(stored) != len(ids) {
		t.Errorf("invariant: %d operations stored, %d keys accepted", len(stored), len(ids))
	}
	t.Logf("checked %d volumes, %d operations (%d with an executing event), %d keys on %d instances",
		len(order), len(c.ops), len(started), len(c.byKey), len(c.ds))
}

// story tells a volume's operations, for a failure message.
func (m *volumeModel) story() string {
	var parts []string
	for _, op := range m.ops {
		s := fmt.Sprintf("%s %s %s", op.typ, op.id, op.final.Status)
		if op.final.Error != "" {
			s += " (" + op.final.Error + ")"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

func ptrValue(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// listOperations lists every stored operation, page by page, from
// instance 0.
func (c *chaos) listOperations() []commands.Operation {
	var out []commands.Operation
	path := "/operations?limit=1000"
	for {
		req, _ := http.NewRequest(http.MethodGet, c.ds[0].api+path, nil)
		resp, err := c.hc.Do(req)
		if err != nil {
			c.t.Fatalf("GET %s: %v", path, err)
		}
		var page []commands.Operation
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			c.t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
		}
		out = append(out, page...)
		next := resp.Header.Get("X-Next-Cursor")
		if next == "" {
			return out
		}
		path = "/operations?limit=1000&cursor=" + next
	}
}

// firstExecuting reads every operation event and returns when each
// operation first started executing, by the stream's clock.
func (c *chaos) firstExecuting(ctx context.Context) map[string]time.Time {
	nc, err := nats.Connect(c.natsURL, nats.UserCredentials(bus.CredsFile(c.creds, bus.RoleOperator)))
	if err != nil {
		c.t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		c.t.Fatal(err)
	}
	stream, err := js.Stream(ctx, bus.StreamOps)
	if err != nil {
		c.t.Fatal(err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		c.t.Fatal(err)
	}
	cons, err := js.OrderedConsumer(ctx, bus.StreamOps, jetstream.OrderedConsumerConfig{FilterSubjects: []string{commands.SubjectOpsPrefix + ">"}})
	if err != nil {
		c.t.Fatal(err)
	}
	out := map[string]time.Time{}
	var last uint64
	for n := 0; last < info.State.LastSeq; {
		batch, err := cons.Fetch(500, jetstream.FetchMaxWait(5*time.Second))
		if err != nil || ctx.Err() != nil {
			c.t.Fatalf("operation events: %d read, up to %d of %d: %v %v", n, last, info.State.LastSeq, err, ctx.Err())
		}
		for msg := range batch.Messages() {
			n++
			var op commands.Operation
			meta, merr := msg.Metadata()
			if merr != nil {
				continue
			}
			last = meta.Sequence.Stream
			if json.Unmarshal(msg.Data(), &op) == nil && op.Status == commands.StatusExecuting {
				if _, seen := out[op.ID]; !seen {
					out[op.ID] = meta.Timestamp
				}
			}
		}
	}
	return out
}
