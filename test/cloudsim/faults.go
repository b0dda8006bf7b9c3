package cloudsim

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// AllCommands is the key that applies a per-command fault to every command
// without an entry of its own.
const AllCommands = "*"

// Error kinds of ErrorFault.
const (
	// ErrorKind530 answers HTTP 530 without running the command.
	ErrorKind530 = "530"
	// ErrorKind431 answers HTTP 431 without running the command.
	ErrorKind431 = "431"
	// ErrorKindDrop closes the connection without running the command.
	ErrorKindDrop = "drop"
	// ErrorKindDropAfter runs the command, then closes the connection
	// without answering (the caller cannot know it happened).
	ErrorKindDropAfter = "drop-after"
)

// ErrBadFault is wrapped by fault specification errors.
var ErrBadFault = errors.New("cloudsim: bad fault spec")

// Duration is a time.Duration that reads and writes JSON as "250ms".
type Duration time.Duration

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads "250ms" or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err2 := json.Unmarshal(b, &n); err2 != nil {
			return fmt.Errorf("%w: duration %s", ErrBadFault, b)
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrBadFault, err)
	}
	*d = Duration(v)
	return nil
}

// ErrorFault makes a fraction of a command's calls fail.
type ErrorFault struct {
	// Rate is the probability, 0..1.
	Rate float64 `json:"rate"`
	// Kind is one of the ErrorKind constants.
	Kind string `json:"kind"`
}

// Faults are the injected faults; maps are keyed by command name
// (e.g. "attachVolume") or AllCommands.
type Faults struct {
	// Outage drops every API connection (the control endpoint still answers).
	Outage bool `json:"outage,omitempty"`
	// Latency delays the answer to a command.
	Latency map[string]Duration `json:"latency,omitempty"`
	// Errors fails a fraction of a command's HTTP calls.
	Errors map[string]ErrorFault `json:"errors,omitempty"`
	// JobDuration overrides Config.JobDuration for a command's jobs.
	JobDuration map[string]Duration `json:"jobduration,omitempty"`
	// JobFailureRate fails a fraction of a command's jobs (530, no effect).
	JobFailureRate map[string]float64 `json:"jobfailurerate,omitempty"`
	// JobHangRate leaves a fraction of a command's jobs pending forever.
	JobHangRate map[string]float64 `json:"jobhangrate,omitempty"`
	// JobHold keeps a command's jobs pending while it is set; a held job
	// runs once faults without its hold are set (at its due time, or at
	// once if that has passed).
	JobHold map[string]bool `json:"jobhold,omitempty"`
}

// Validate checks rates are in 0..1, durations are not negative and error
// kinds are known.
func (f Faults) Validate() error {
	for cmd, e := range f.Errors {
		if err := checkRate(cmd, e.Rate); err != nil {
			return err
		}
		switch e.Kind {
		case ErrorKind530, ErrorKind431, ErrorKindDrop, ErrorKindDropAfter:
		default:
			return fmt.Errorf("%w: %s: unknown error kind %q", ErrBadFault, cmd, e.Kind)
		}
	}
	for _, m := range []map[string]float64{f.JobFailureRate, f.JobHangRate} {
		for cmd, r := range m {
			if err := checkRate(cmd, r); err != nil {
				return err
			}
		}
	}
	for _, m := range []map[string]Duration{f.Latency, f.JobDuration} {
		for cmd, d := range m {
			if d < 0 {
				return fmt.Errorf("%w: %s: negative duration", ErrBadFault, cmd)
			}
		}
	}
	return nil
}

func checkRate(cmd string, r float64) error {
	if r < 0 || r > 1 {
		return fmt.Errorf("%w: %s: rate %v not in 0..1", ErrBadFault, cmd, r)
	}
	return nil
}

// lookup returns m[cmd], else m[AllCommands].
func lookup[V any](m map[string]V, cmd string) (V, bool) {
	if v, ok := m[cmd]; ok {
		return v, true
	}
	v, ok := m[AllCommands]
	return v, ok
}

// parseList splits "k=v,k=v" and parses each value.
func parseList[V any](spec string, parse func(string) (V, error)) (map[string]V, error) {
	out := map[string]V{}
	if strings.TrimSpace(spec) == "" {
		return out, nil
	}
	for _, item := range strings.Split(spec, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(item), "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%w: %q is not command=value", ErrBadFault, item)
		}
		pv, err := parse(v)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrBadFault, k, err)
		}
		out[k] = pv
	}
	return out, nil
}

// ParseDurations parses "attachVolume=2s,*=100ms".
func ParseDurations(spec string) (map[string]Duration, error) {
	return parseList(spec, func(v string) (Duration, error) {
		d, err := time.ParseDuration(v)
		if err == nil && d < 0 {
			err = errors.New("negative duration")
		}
		return Duration(d), err
	})
}

// ParseRates parses "attachVolume=0.5,*=0.1".
func ParseRates(spec string) (map[string]float64, error) {
	return parseList(spec, func(v string) (float64, error) {
		r, err := strconv.ParseFloat(v, 64)
		if err == nil {
			err = checkRate("", r)
		}
		return r, err
	})
}

// ParseErrorFaults parses "attachVolume=0.5:530,listVolumes=1:drop".
func ParseErrorFaults(spec string) (map[string]ErrorFault, error) {
	m, err := parseList(spec, func(v string) (ErrorFault, error) {
		rate, kind, ok := strings.Cut(v, ":")
		if !ok {
			return ErrorFault{}, fmt.Errorf("%q is not rate:kind", v)
		}
		r, err := strconv.ParseFloat(rate, 64)
		return ErrorFault{Rate: r, Kind: kind}, err
	})
	if err != nil {
		return nil, err
	}
	return m, Faults{Errors: m}.Validate()
}

// Stats are counters of what the simulator did.
type Stats struct {
	// Calls counts API requests per command since start (not persisted),
	// including rejected and fault-injected ones.
	Calls map[string]int64 `json:"calls"`
	// AttachesSucceeded counts attach jobs that succeeded, per volume id
	// (persisted across restarts).
	AttachesSucceeded map[string]int64 `json:"attachessucceeded"`
	// DetachesSucceeded counts detach jobs that succeeded, per volume id
	// (persisted across restarts).
	DetachesSucceeded map[string]int64 `json:"detachessucceeded"`
	// PendingJobs is the number of jobs not yet finished.
	PendingJobs int `json:"pendingjobs"`
}
