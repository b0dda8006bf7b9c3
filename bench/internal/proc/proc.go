// Package proc holds what the benchmarks under bench/ share to run
// volumed and the simulator as processes and to read the machine: free
// ports, waiting for an HTTP answer, stopping a process, its CPU time and
// resident memory from /proc, and the machine's model and load.
package proc

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/volumed/volumed/test/cloudsim"
)

// userHZ is the unit of utime and stime in /proc/<pid>/stat (USER_HZ,
// 100 on Linux whatever the kernel's tick).
const userHZ = 100

var httpClient = &http.Client{Timeout: 30 * time.Second}

// FreePorts returns n distinct TCP ports free on loopback now (each held
// until all are chosen, so that none is handed out twice).
func FreePorts(n int) []string {
	ports := make([]string, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			panic(err)
		}
		defer l.Close()
		ports[i] = strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// WaitHTTP polls u (with token as bearer when not empty) until it
// answers 200, for at most limit.
func WaitHTTP(ctx context.Context, u, token string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := httpClient.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("%s: %s", resp.Status, body)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no 200 from %s within %s (last: %v)", u, limit, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop sends SIGTERM to a started command and waits for it, killing it
// after a minute.
func Stop(c *exec.Cmd) {
	_ = c.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		_ = c.Process.Kill()
		<-done
	}
}

// CPU is the CPU time (user and system) a process has used so far, from
// utime and stime of /proc/<pid>/stat.
func CPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// the fields counted are those after its closing parenthesis.
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks int64
	for _, v := range f[11:13] { // utime, stime: fields 14 and 15
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// RSSMB is a process's resident memory (VmRSS) in MB (10^6 bytes).
func RSSMB(pid int) float64 {
	kb := field(fmt.Sprintf("/proc/%d/status", pid), "VmRSS:")
	return kb * 1024 / 1e6
}

// HWMMB is a process's peak resident memory (VmHWM) in MB.
func HWMMB(pid int) float64 {
	kb := field(fmt.Sprintf("/proc/%d/status", pid), "VmHWM:")
	return kb * 1024 / 1e6
}

// field reads the kB figure of a /proc file's field.
func field(path, name string) float64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name); ok {
			v, _ := strconv.ParseFloat(strings.Fields(rest)[0], 64)
			return v
		}
	}
	return 0
}

// LoadAvg is the machine's load average over 1, 5 and 15 minutes: the
// figures are only comparable under a similar load.
func LoadAvg() string {
	data, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(data)); len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "unknown"
}

// Machine describes the machine: cores, CPU model and memory.
func Machine() string {
	return fmt.Sprintf("%d cores, %s, %.0f GiB", runtime.NumCPU(), cpuModel(), field("/proc/meminfo", "MemTotal:")/(1<<20))
}

func cpuModel() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if name, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
		}
	}
	return "unknown CPU"
}

// Start runs a binary with its output in dir/name.log.
func Start(dir, name, bin string, args ...string) (*exec.Cmd, error) {
	log, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return cmd, nil
}

// SimCalls reads the simulator's API calls so far, by command, from its
// stats endpoint u.
func SimCalls(ctx context.Context, u string) (map[string]int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var st cloudsim.Stats
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("%s: %w", u, err)
	}
	if st.Calls == nil {
		st.Calls = map[string]int64{}
	}
	return st.Calls, nil
}

// Pct is the p-quantile (0 to 1) of sorted latencies, in ms; 0 for none.
func Pct(lat []time.Duration, p float64) float64 {
	if len(lat) == 0 {
		return 0
	}
	i := min(len(lat)-1, int(float64(len(lat))*p))
	return float64(lat[i].Microseconds()) / 1000
}

// Verdict says whether a figure met its goal.
func Verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// WorkDir returns dir, or, when it is empty, a new temporary directory
// named after prefix that done removes.
func WorkDir(dir, prefix string) (string, func(), error) {
	if dir != "" {
		return dir, func() {}, nil
	}
	tmp, err := os.MkdirTemp("", prefix)
	if err != nil {
		return "", nil, err
	}
	return tmp, func() { os.RemoveAll(tmp) }, nil
}
