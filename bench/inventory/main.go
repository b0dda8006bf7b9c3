// Command inventory measures what a large CloudStack inventory costs
// volumed (make bench-inventory): for each size VOLUMES/VMS it writes a
// simulator inventory of VMS running VMs (a root volume each) and
// VOLUMES-VMS data volumes (up to six attached to each VM, the rest
// detached), records through the state store the mapping volumed keeps of
// each attached data volume, then starts the simulator and volumed on
// them and measures:
//
//   - a force-sync (POST /admin/force-sync): time, volumed's CPU, its
//     CloudStack calls (from the simulator's counters), resident memory;
//   - a periodic reconcile (--sync-interval): the CPU and calls of the
//     window it runs in;
//   - a refresh of the pre-check cache: an attach to an unknown VM misses
//     the cached VM list and waits for its refresh.
//
// The figures of each size are printed, then the ratio of the last size's
// to the first's beside the ratio of the sizes: linear growth is a ratio
// near the sizes'. Nothing is asserted.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/volumed/volumed/bench/internal/proc"
	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
)

type config struct {
	volumed  string
	cloudsim string
	label    string
	sizes    []size
	syncs    int
	misses   int
	period   time.Duration
	work     string
}

// size is one inventory: volumes in all (root volumes included) and VMs.
type size struct{ volumes, vms int }

func (s size) String() string { return fmt.Sprintf("%d volumes / %d VMs", s.volumes, s.vms) }

func main() {
	var c config
	var sizes string
	flag.StringVar(&c.volumed, "volumed", "", "volumed binary")
	flag.StringVar(&c.cloudsim, "cloudsim", "", "cloudsim binary (test/cloudsim/cmd/cloudsim)")
	flag.StringVar(&c.label, "label", "volumed", "name of this run in the output")
	flag.StringVar(&sizes, "sizes", "1000/100,10000/1000", "comma-separated VOLUMES/VMS")
	flag.IntVar(&c.syncs, "syncs", 3, "force-syncs measured per size")
	flag.IntVar(&c.misses, "misses", 5, "pre-check cache refreshes measured per size")
	flag.DurationVar(&c.period, "sync-interval", 20*time.Second, "volumed's --sync-interval, the window the periodic reconcile is measured over")
	flag.StringVar(&c.work, "work", "", "work directory; default a new temporary one, removed after")
	flag.Parse()
	for _, s := range strings.Split(sizes, ",") {
		v, m, ok := strings.Cut(s, "/")
		nv, err1 := strconv.Atoi(v)
		nm, err2 := strconv.Atoi(m)
		if !ok || err1 != nil || err2 != nil || nm < 1 || nv < nm {
			fmt.Fprintf(os.Stderr, "bench-inventory: -sizes: want VOLUMES/VMS with VOLUMES ≥ VMS ≥ 1, got %q\n", s)
			os.Exit(2)
		}
		c.sizes = append(c.sizes, size{nv, nm})
	}
	if err := run(context.Background(), c); err != nil {
		fmt.Fprintln(os.Stderr, "bench-inventory:", err)
		os.Exit(1)
	}
}

// figures are one size's measurements.
type figures struct {
	mappings int
	// force-sync: median time, CPU and calls per sync.
	syncTime, syncCPU time.Duration
	syncCalls         map[string]int64
	rssStart, rssSync float64
	hwm               float64
	// periodic reconcile: CPU and calls over one sync interval.
	periodCPU   time.Duration
	periodCalls map[string]int64
	// pre-check cache: median time, CPU and calls per refresh.
	missTime, missCPU time.Duration
	missCalls         map[string]int64
}

func run(ctx context.Context, c config) error {
	if c.volumed == "" || c.cloudsim == "" {
		return errors.New("-volumed and -cloudsim are required")
	}
	work, done, err := proc.WorkDir(c.work, "bench-inventory-")
	if err != nil {
		return err
	}
	defer done()
	c.work = work
	fmt.Printf("%s: machine %s; load %s\n", c.label, proc.Machine(), proc.LoadAvg())
	var all []figures
	for i, s := range c.sizes {
		dir := filepath.Join(c.work, strconv.Itoa(i))
		f, err := measure(ctx, c, s, dir)
		if err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
		all = append(all, f)
		printFigures(s, f)
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
	}
	if len(all) > 1 {
		first, last := all[0], all[len(all)-1]
		fmt.Printf("  growth from %s to %s (sizes ×%.1f volumes, ×%.1f VMs, ×%.1f mappings); load %s\n", c.sizes[0], c.sizes[len(c.sizes)-1],
			float64(c.sizes[len(c.sizes)-1].volumes)/float64(c.sizes[0].volumes), float64(c.sizes[len(c.sizes)-1].vms)/float64(c.sizes[0].vms),
			float64(last.mappings)/float64(max(first.mappings, 1)), proc.LoadAvg())
		ratio := func(name string, a, b float64) {
			fmt.Printf("    %-40s ×%.1f\n", name, b/max(a, 1e-9))
		}
		ratio("force-sync time", first.syncTime.Seconds(), last.syncTime.Seconds())
		ratio("force-sync CPU", first.syncCPU.Seconds(), last.syncCPU.Seconds())
		ratio("force-sync CloudStack calls", float64(sum(first.syncCalls)), float64(sum(last.syncCalls)))
		ratio("periodic reconcile CPU", first.periodCPU.Seconds(), last.periodCPU.Seconds())
		ratio("pre-check refresh time", first.missTime.Seconds(), last.missTime.Seconds())
		ratio("pre-check refresh calls", float64(sum(first.missCalls)), float64(sum(last.missCalls)))
	}
	return nil
}

func sum(m map[string]int64) (n int64) {
	for _, v := range m {
		n += v
	}
	return n
}

func callList(m map[string]int64) string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if m[k] != 0 {
			out = append(out, fmt.Sprintf("%s %d", k, m[k]))
		}
	}
	return strings.Join(out, ", ")
}

func printFigures(s size, f figures) {
	fmt.Printf("  %s, %d mappings\n", s, f.mappings)
	fmt.Printf("    %-40s %8.0f ms, CPU %.0f ms, %d calls (%s)\n", "force-sync (median)", ms(f.syncTime), ms(f.syncCPU), sum(f.syncCalls), callList(f.syncCalls))
	fmt.Printf("    %-40s CPU %.0f ms, %d calls (%s)\n", "periodic reconcile (one interval)", ms(f.periodCPU), sum(f.periodCalls), callList(f.periodCalls))
	fmt.Printf("    %-40s %8.0f ms, CPU %.0f ms, %d calls (%s)\n", "pre-check cache refresh (median)", ms(f.missTime), ms(f.missCPU), sum(f.missCalls), callList(f.missCalls))
	fmt.Printf("    %-40s %.1f MB after start, %.1f MB after the syncs, peak %.1f MB\n", "volumed resident (VmRSS)", f.rssStart, f.rssSync, f.hwm)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func volumeID(i int) string { return fmt.Sprintf("0000000d-0000-4000-8000-%012x", i) }
func rootID(i int) string   { return fmt.Sprintf("0000000e-0000-4000-8000-%012x", i) }
func vmID(i int) string     { return fmt.Sprintf("0000000f-0000-4000-8000-%012x", i) }

// dataDevices are the device ids of a VM's data disks, in order.
var dataDevices = []int64{1, 2, 4, 5, 6, 7}

// inventory is the simulator's inventory of s.
func inventory(s size) *cloudsim.Inventory {
	inv := cloudsim.DefaultInventory()
	for i := range s.vms {
		inv.VMs = append(inv.VMs, cloudsim.VM{ID: vmID(i), Name: fmt.Sprintf("vm-%d", i), ZoneID: cloudsim.ZoneID, State: "Running",
			RootVolume: &cloudsim.RootVolume{ID: rootID(i), SizeGB: 20}})
	}
	for j := range s.volumes - s.vms {
		v := cloudsim.DataVolume{ID: volumeID(j), Name: fmt.Sprintf("data-%d", j), ZoneID: cloudsim.ZoneID, SizeGB: 1 + int64(j%8)}
		if slot := j / s.vms; slot < len(dataDevices) {
			v.VMID, v.DeviceID = vmID(j%s.vms), dataDevices[slot]
		}
		inv.Volumes = append(inv.Volumes, v)
	}
	return inv
}

// seed records the mapping volumed keeps of each attached data volume,
// through the state store on data (the embedded server's files and
// volumed's account), 32 writers at once.
func seed(ctx context.Context, inv *cloudsim.Inventory, data string) (int, error) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: data, Logger: log})
	if err := b.Start(ctx); err != nil {
		return 0, err
	}
	defer b.Close(ctx)
	s, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{Logger: log})
	if err != nil {
		return 0, err
	}
	defer s.Close(ctx)
	now := time.Now().UTC()
	ms := make(chan commands.Mapping)
	errc := make(chan error, 32)
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for m := range ms {
				if _, err := s.PutMapping(ctx, m); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	n := 0
	for _, v := range inv.Volumes {
		if v.VMID == "" {
			continue
		}
		dev := v.DeviceID
		m := commands.Mapping{ID: "mapping-" + v.ID, VolumeID: v.ID, VMID: v.VMID, CloudStackState: commands.CloudStackAttached,
			LinuxState: commands.LinuxNotApplicable, Size: v.SizeGB << 30, DeviceID: &dev, LastSync: now, CreatedAt: now, UpdatedAt: now}
		select {
		case ms <- m:
			n++
		case err := <-errc:
			close(ms)
			wg.Wait()
			return n, err
		}
	}
	close(ms)
	wg.Wait()
	select {
	case err := <-errc:
		return n, err
	default:
	}
	return n, nil
}

// measure runs the simulator and volumed on size s in dir.
func measure(ctx context.Context, c config, s size, dir string) (figures, error) {
	var f figures
	inv := inventory(s)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return f, err
	}
	invFile := filepath.Join(dir, "inventory.json")
	data, err := json.Marshal(inv)
	if err != nil {
		return f, err
	}
	if err := os.WriteFile(invFile, data, 0o600); err != nil {
		return f, err
	}
	dataDir := filepath.Join(dir, "data")
	if f.mappings, err = seed(ctx, inv, dataDir); err != nil {
		return f, fmt.Errorf("seed mappings: %w", err)
	}
	ports := proc.FreePorts(4)
	simPort, natsPort, apiPort := ports[0], ports[1], ports[2]
	sim, err := proc.Start(dir, "cloudsim", c.cloudsim, "--listen", "127.0.0.1:"+simPort, "--state-dir", filepath.Join(dir, "cloudsim"),
		"--inventory", invFile, "--job-duration", "20ms", "--log-level", "warn")
	if err != nil {
		return f, err
	}
	defer proc.Stop(sim)
	simStats := "http://127.0.0.1:" + simPort + "/_sim/stats"
	if err := proc.WaitHTTP(ctx, simStats, "", time.Minute); err != nil {
		return f, err
	}
	natsConf := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(natsConf, []byte("listen: 127.0.0.1:"+natsPort+"\njetstream {}\n"), 0o600); err != nil {
		return f, err
	}
	vd, err := proc.Start(dir, "volumed", c.volumed, "--cloudstack-url", "http://127.0.0.1:"+simPort+"/client/api",
		"--cloudstack-api-key", cloudsim.DefaultAPIKey, "--cloudstack-secret-key", cloudsim.DefaultSecretKey,
		"--vm-id", cloudsim.ApplianceVMID, "--listen", "127.0.0.1:"+apiPort, "--data-dir", dataDir,
		"--nats-config", natsConf, "--nbd-listen", "", "--device-agent=false", "--sync-interval", c.period.String(),
		"--log-level", "warn")
	if err != nil {
		return f, err
	}
	defer proc.Stop(vd)
	began := time.Now()
	api := "http://127.0.0.1:" + apiPort + "/api/v1"
	if err := proc.WaitHTTP(ctx, api+"/health", "", 5*time.Minute); err != nil {
		return f, err
	}
	token, err := os.ReadFile(filepath.Join(dataDir, "api-token"))
	if err != nil {
		return f, err
	}
	cl, err := client.New(api, client.WithToken(strings.TrimSpace(string(token))), client.WithHTTPClient(&http.Client{Timeout: 10 * time.Minute}))
	if err != nil {
		return f, err
	}
	pid := vd.Process.Pid
	// Let the start's own work (the first cache refresh) end.
	time.Sleep(2 * time.Second)
	f.rssStart = proc.RSSMB(pid)

	// measured runs fn and returns its time, volumed's CPU and the calls.
	measured := func(fn func() error) (time.Duration, time.Duration, map[string]int64, error) {
		calls0, err := proc.SimCalls(ctx, simStats)
		if err != nil {
			return 0, 0, nil, err
		}
		cpu0, err := proc.CPU(pid)
		if err != nil {
			return 0, 0, nil, err
		}
		t0 := time.Now()
		err = fn()
		el := time.Since(t0)
		cpu1, cerr := proc.CPU(pid)
		calls1, serr := proc.SimCalls(ctx, simStats)
		if err := errors.Join(err, cerr, serr); err != nil {
			return 0, 0, nil, err
		}
		for k, v := range calls0 {
			calls1[k] -= v
		}
		return el, cpu1 - cpu0, calls1, nil
	}

	// The pre-check cache: an attach to an unknown VM waits for a refresh
	// of the VM list begun after it (a second after the last one).
	var missTimes, missCPUs []time.Duration
	for i := range c.misses {
		time.Sleep(1100 * time.Millisecond)
		el, cpu, calls, err := measured(func() error {
			_, err := cl.AttachVolume(ctx, volumeID(0), fmt.Sprintf("0000000f-ffff-4000-8000-%012x", i))
			if err == nil {
				return errors.New("attach to an unknown VM accepted")
			}
			var apiErr *client.Error
			if !errors.As(err, &apiErr) {
				return err
			}
			return nil
		})
		if err != nil {
			return f, fmt.Errorf("pre-check miss: %w", err)
		}
		missTimes, missCPUs, f.missCalls = append(missTimes, el), append(missCPUs, cpu), calls
	}
	f.missTime, f.missCPU = median(missTimes), median(missCPUs)

	var syncTimes, syncCPUs []time.Duration
	for range c.syncs {
		el, cpu, calls, err := measured(func() error {
			res, err := cl.ForceSync(ctx)
			if err == nil && (len(res.Errors) > 0 || len(res.Changes) > 0) {
				err = fmt.Errorf("force-sync: %d errors (%v), %d changes (%v): the inventory and the mappings should agree",
					len(res.Errors), first(res.Errors), len(res.Changes), first(res.Changes))
			}
			return err
		})
		if err != nil {
			return f, err
		}
		syncTimes, syncCPUs, f.syncCalls = append(syncTimes, el), append(syncCPUs, cpu), calls
	}
	f.syncTime, f.syncCPU = median(syncTimes), median(syncCPUs)
	f.rssSync = proc.RSSMB(pid)

	// One periodic reconcile: a window of one interval, with nothing else
	// asked, after the next one is due.
	if wait := c.period - time.Since(began)%c.period; wait < c.period {
		time.Sleep(wait / 2)
	}
	_, f.periodCPU, f.periodCalls, err = measured(func() error {
		time.Sleep(c.period)
		return nil
	})
	if err != nil {
		return f, err
	}
	f.hwm = proc.HWMMB(pid)
	return f, nil
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
