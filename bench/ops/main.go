// Command ops measures volumed's CPU per operation and its latency on the
// mixed workload (make bench-ops): CLIENTS clients each running create ->
// attach -> detach -> delete in a loop, through the REST API, against a
// CloudStack simulator whose jobs take JOB, with the embedded store. Each
// client has a VM of its own in the simulator's inventory. After a
// warm-up, it reads volumed's CPU time (utime and stime of
// /proc/<pid>/stat) at the start and the end of the measured window and
// divides it by the operations that ended in it; the latency of an
// operation is from its request to its terminal state, as a client sees
// it (GET /operations/{id}?wait). Nothing is asserted: the figures are
// printed beside the goals of issue 21.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/volumed/volumed/bench/internal/proc"
	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/test/cloudsim"
)

// Goals of issue 21.
const (
	goalCPUms      = 1.5
	goalOverJobMS  = 15.0
	volumeSize     = 1 << 30
	applianceVM    = cloudsim.ApplianceVMID
	simAPIKey      = cloudsim.DefaultAPIKey
	simSecretKey   = cloudsim.DefaultSecretKey
	benchZone      = cloudsim.ZoneID
	benchOffering  = cloudsim.CustomOfferingID
	pprofSlackTime = 2 * time.Second
)

type config struct {
	volumed  string
	cloudsim string
	label    string
	clients  int
	job      time.Duration
	warmup   time.Duration
	duration time.Duration
	logLevel string
	profile  string
	work     string
}

func main() {
	var c config
	flag.StringVar(&c.volumed, "volumed", "", "volumed binary")
	flag.StringVar(&c.cloudsim, "cloudsim", "", "cloudsim binary (test/cloudsim/cmd/cloudsim)")
	flag.StringVar(&c.label, "label", "volumed", "name of this run in the output")
	flag.IntVar(&c.clients, "clients", 8, "clients running the cycle at once")
	flag.DurationVar(&c.job, "job", 20*time.Millisecond, "the simulator's job duration")
	flag.DurationVar(&c.warmup, "warmup", 5*time.Second, "cycles run before the measured window")
	flag.DurationVar(&c.duration, "duration", 30*time.Second, "measured window")
	flag.StringVar(&c.logLevel, "log-level", "info", "volumed's --log-level")
	flag.StringVar(&c.profile, "profile", "", "write a CPU profile of volumed over the window to this file (volumed started with --pprof-listen)")
	flag.StringVar(&c.work, "work", "", "work directory; default a new temporary one, removed after")
	flag.Parse()
	if err := run(context.Background(), c); err != nil {
		fmt.Fprintln(os.Stderr, "bench-ops:", err)
		os.Exit(1)
	}
}

// vmID is the VM of client i.
func vmID(i int) string { return fmt.Sprintf("00000000-0000-4000-8000-%012x", i+1) }

func run(ctx context.Context, c config) error {
	if c.volumed == "" || c.cloudsim == "" {
		return errors.New("-volumed and -cloudsim are required")
	}
	work, done, err := proc.WorkDir(c.work, "bench-ops-")
	if err != nil {
		return err
	}
	defer done()
	c.work = work
	inv := cloudsim.DefaultInventory()
	for i := range c.clients {
		inv.VMs = append(inv.VMs, cloudsim.VM{ID: vmID(i), Name: fmt.Sprintf("bench-vm-%d", i), ZoneID: benchZone, State: "Running"})
	}
	invFile := filepath.Join(c.work, "inventory.json")
	data, err := json.Marshal(inv)
	if err != nil {
		return err
	}
	if err := os.WriteFile(invFile, data, 0o600); err != nil {
		return err
	}
	ports := proc.FreePorts(4)
	simPort, natsPort, apiPort := ports[0], ports[1], ports[2]
	sim, err := proc.Start(c.work, "cloudsim", c.cloudsim, "--listen", "127.0.0.1:"+simPort, "--state-dir", filepath.Join(c.work, "cloudsim"),
		"--inventory", invFile, "--job-duration", c.job.String(), "--log-level", "warn")
	if err != nil {
		return err
	}
	defer proc.Stop(sim)
	if err := proc.WaitHTTP(ctx, "http://127.0.0.1:"+simPort+"/_sim/stats", "", time.Minute); err != nil {
		return err
	}
	natsConf := filepath.Join(c.work, "nats.conf")
	if err := os.WriteFile(natsConf, []byte("listen: 127.0.0.1:"+natsPort+"\njetstream {}\n"), 0o600); err != nil {
		return err
	}
	dataDir := filepath.Join(c.work, "data")
	args := []string{"--cloudstack-url", "http://127.0.0.1:" + simPort + "/client/api",
		"--cloudstack-api-key", simAPIKey, "--cloudstack-secret-key", simSecretKey,
		"--vm-id", applianceVM, "--listen", "127.0.0.1:" + apiPort,
		"--data-dir", dataDir, "--nats-config", natsConf, "--nbd-listen", "", "--device-agent=false",
		"--log-level", c.logLevel}
	pprofAddr := ""
	if c.profile != "" {
		pprofAddr = "127.0.0.1:" + ports[3]
		args = append(args, "--pprof-listen", pprofAddr)
	}
	vd, err := proc.Start(c.work, "volumed", c.volumed, args...)
	if err != nil {
		return err
	}
	defer proc.Stop(vd)
	api := "http://127.0.0.1:" + apiPort + "/api/v1"
	if err := proc.WaitHTTP(ctx, api+"/health", "", 2*time.Minute); err != nil {
		return err
	}
	token, err := os.ReadFile(filepath.Join(dataDir, "api-token"))
	if err != nil {
		return err
	}
	cl, err := client.New(api, client.WithToken(strings.TrimSpace(string(token))),
		client.WithHTTPClient(&http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2 * c.clients}}))
	if err != nil {
		return err
	}

	w := &window{}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, c.clients)
	for i := range c.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := cycle(ctx, cl, i, w); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("client %d: %w", i, err)
				cancel()
			}
		}()
	}
	fail := func() error {
		select {
		case err := <-errc:
			return err
		default:
			return nil
		}
	}
	time.Sleep(c.warmup)
	if err := fail(); err != nil {
		return err
	}
	load := proc.LoadAvg()
	cpu0, err := proc.CPU(vd.Process.Pid)
	if err != nil {
		return err
	}
	simCPU0, _ := proc.CPU(sim.Process.Pid)
	simURL := "http://127.0.0.1:" + simPort + "/_sim/stats"
	calls0, err := proc.SimCalls(ctx, simURL)
	if err != nil {
		return err
	}
	w.open()
	began := time.Now()
	var prof []byte
	var profErr error
	profDone := make(chan struct{})
	go func() {
		defer close(profDone)
		if pprofAddr != "" {
			prof, profErr = cpuProfile(ctx, pprofAddr, c.duration-pprofSlackTime)
		}
	}()
	time.Sleep(c.duration)
	cpu1, err := proc.CPU(vd.Process.Pid)
	if err != nil {
		return err
	}
	simCPU1, _ := proc.CPU(sim.Process.Pid)
	lat := w.close()
	calls1, err := proc.SimCalls(ctx, simURL)
	if err != nil {
		return err
	}
	for cmd, n := range calls0 {
		calls1[cmd] -= n
	}
	elapsed := time.Since(began)
	rss := proc.RSSMB(vd.Process.Pid)
	<-profDone
	cancel()
	wg.Wait()
	if err := fail(); err != nil {
		return err
	}
	if profErr != nil {
		return fmt.Errorf("profile: %w", profErr)
	}
	if prof != nil {
		if err := os.WriteFile(c.profile, prof, 0o644); err != nil {
			return err
		}
	}
	report(c, lat, cpu1-cpu0, simCPU1-simCPU0, elapsed, rss, load, calls1)
	return nil
}

// cpuProfile fetches a CPU profile of d from volumed's pprof listener.
func cpuProfile(ctx context.Context, addr string, d time.Duration) ([]byte, error) {
	u := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, int(d.Seconds()))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// window collects the latencies of the operations that end while it is
// open, by type.
type window struct {
	mu  sync.Mutex
	on  bool
	lat map[commands.OpType][]time.Duration
}

func (w *window) open() {
	w.mu.Lock()
	w.on, w.lat = true, map[commands.OpType][]time.Duration{}
	w.mu.Unlock()
}

func (w *window) close() map[commands.OpType][]time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.on = false
	return w.lat
}

func (w *window) add(t commands.OpType, d time.Duration) {
	w.mu.Lock()
	if w.on {
		w.lat[t] = append(w.lat[t], d)
	}
	w.mu.Unlock()
}

// cycle runs create -> attach -> detach -> delete until ctx ends.
func cycle(ctx context.Context, cl *client.Client, i int, w *window) error {
	vm := vmID(i)
	for n := 0; ctx.Err() == nil; n++ {
		var volume string
		steps := []struct {
			typ commands.OpType
			do  func() (commands.Operation, error)
		}{
			{commands.OpCreate, func() (commands.Operation, error) {
				return cl.CreateVolume(ctx, commands.CreateRequest{Name: fmt.Sprintf("bench-%d-%d", i, n), Size: volumeSize,
					DiskOfferingID: benchOffering, ZoneID: benchZone})
			}},
			{commands.OpAttach, func() (commands.Operation, error) { return cl.AttachVolume(ctx, volume, vm) }},
			{commands.OpDetach, func() (commands.Operation, error) { return cl.DetachVolume(ctx, volume) }},
			{commands.OpDelete, func() (commands.Operation, error) { return cl.DeleteVolume(ctx, volume) }},
		}
		for _, s := range steps {
			began := time.Now()
			op, err := s.do()
			if err == nil && !op.Status.Terminal() {
				op, err = cl.Wait(ctx, op.ID)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", s.typ, err)
			}
			if op.Status != commands.StatusCompleted {
				return fmt.Errorf("%s %s: %s: %s", s.typ, op.ID, op.Status, op.Error)
			}
			w.add(s.typ, time.Since(began))
			if s.typ == commands.OpCreate {
				volume = op.VolumeID
			}
		}
	}
	return nil
}

func report(c config, lat map[commands.OpType][]time.Duration, cpu, simCPU, elapsed time.Duration, rss float64, load string,
	calls map[string]int64) {
	var all []time.Duration
	for _, l := range lat {
		slices.Sort(l)
		all = append(all, l...)
	}
	slices.Sort(all)
	n := len(all)
	if n == 0 {
		fmt.Printf("%s: no operation ended in the window\n", c.label)
		return
	}
	cpuPerOp := float64(cpu.Microseconds()) / 1000 / float64(n)
	p50 := proc.Pct(all, 0.5)
	fmt.Printf("%s: %d clients, %s jobs, %d operations in %s (%.1f/s); machine %s; load %s\n",
		c.label, c.clients, c.job, n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), proc.Machine(), load)
	fmt.Printf("  %-34s %8.2f ms   goal ≤ %.1f ms  %s\n", "volumed CPU per operation", cpuPerOp, goalCPUms, proc.Verdict(cpuPerOp <= goalCPUms))
	fmt.Printf("  %-34s %8.2f / %.2f ms   goal p50 ≤ %.0f ms  %s\n", "latency p50 / p99", p50, proc.Pct(all, 0.99),
		float64(c.job.Milliseconds())+goalOverJobMS, proc.Verdict(p50 <= float64(c.job.Milliseconds())+goalOverJobMS))
	for _, t := range []commands.OpType{commands.OpCreate, commands.OpAttach, commands.OpDetach, commands.OpDelete} {
		fmt.Printf("    %-32s %8.2f / %.2f ms  (%d)\n", string(t)+" p50 / p99", proc.Pct(lat[t], 0.5), proc.Pct(lat[t], 0.99), len(lat[t]))
	}
	fmt.Printf("  %-34s %8.2f ms (%.0f%% of a core)\n", "simulator CPU per operation", float64(simCPU.Microseconds())/1000/float64(n),
		100*simCPU.Seconds()/elapsed.Seconds())
	fmt.Printf("  %-34s %8.1f MB\n", "volumed resident (VmRSS) after", rss)
	var total int64
	var per []string
	for _, cmd := range slices.Sorted(maps.Keys(calls)) {
		if calls[cmd] > 0 {
			total += calls[cmd]
			per = append(per, fmt.Sprintf("%s %.2f", cmd, float64(calls[cmd])/float64(n)))
		}
	}
	fmt.Printf("  %-34s %8.2f (%s)\n", "CloudStack calls per operation", float64(total)/float64(n), strings.Join(per, ", "))
}
