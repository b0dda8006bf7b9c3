// Command cloudsim runs the CloudStack API simulator (package test/cloudsim)
// at http://ADDR/client/api, with its control endpoint at /_sim, until
// SIGINT or SIGTERM. It logs its URL, API key and secret key at start.
// Every flag can also be set by an environment variable: CLOUDSIM_ and the
// flag name in capitals with - as _, e.g. CLOUDSIM_STATE_DIR.
//
// It is a test tool: `make run` starts it beside volumed (scripts/run.sh),
// and bench/accept.sh and the e2e tests run it as a process.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/volumed/volumed/test/cloudsim"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		msg := err.Error()
		if !strings.HasPrefix(msg, "cloudsim: ") {
			msg = "cloudsim: " + msg
		}
		fmt.Fprintln(os.Stderr, msg)
		os.Exit(1)
	}
}

// envName is the environment variable of a flag.
func envName(flagName string) string {
	return "CLOUDSIM_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parse reads flags, then fills unset ones from the environment.
func parse(args []string, getenv func(string) string, out io.Writer) (cloudsim.Config, string, error) {
	fs := flag.NewFlagSet("cloudsim", flag.ContinueOnError)
	fs.SetOutput(out)
	var cfg cloudsim.Config
	var inventory, localDevices, logLevel string
	var seed uint64
	fs.StringVar(&cfg.Listen, "listen", cloudsim.DefaultListen, "TCP address to serve on; the API is at http://ADDR/client/api")
	fs.StringVar(&cfg.APIKey, "api-key", cloudsim.DefaultAPIKey, "the API key clients must send")
	fs.StringVar(&cfg.SecretKey, "secret-key", cloudsim.DefaultSecretKey, "the secret key signatures are checked with")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "directory for state.json and backing files (default: a new temporary directory)")
	fs.StringVar(&inventory, "inventory", "", "JSON inventory `FILE` replacing the built-in zones, offerings and VMs")
	fs.StringVar(&localDevices, "local-devices", string(cloudsim.LocalDevicesAuto), "auto: loop devices for VMs with localdevices when root with /dev/loop-control; off: never")
	fs.BoolVar(&cfg.AnonymousBackingFiles, "anonymous-backing-files", false, "give backing files random names that do not carry the volume id")
	fs.DurationVar(&cfg.JobDuration, "job-duration", cloudsim.DefaultJobDuration, "how long an async job takes")
	fs.DurationVar(&cfg.JobJitter, "job-jitter", 0, "random extra job time, 0..this")
	fs.Uint64Var(&seed, "seed", 0, "seed for fault and jitter draws (same seed, same draws)")
	fs.BoolVar(&cfg.Faults.Outage, "outage", false, "fault: drop every API connection")
	fs.Func("latency", "fault: delay answers per command, `CMD=DUR,...` (CMD * means all), e.g. listVolumes=200ms", func(v string) (err error) {
		cfg.Faults.Latency, err = cloudsim.ParseDurations(v)
		return err
	})
	fs.Func("errors", "fault: fail a fraction of calls, `CMD=RATE:KIND,...` with KIND 530|431|drop|drop-after, e.g. attachVolume=0.3:530", func(v string) (err error) {
		cfg.Faults.Errors, err = cloudsim.ParseErrorFaults(v)
		return err
	})
	fs.Func("job-durations", "fault: job time per command, `CMD=DUR,...`, e.g. attachVolume=5s", func(v string) (err error) {
		cfg.Faults.JobDuration, err = cloudsim.ParseDurations(v)
		return err
	})
	fs.Func("job-failure-rate", "fault: fail a fraction of jobs (530, no effect), `CMD=RATE,...`", func(v string) (err error) {
		cfg.Faults.JobFailureRate, err = cloudsim.ParseRates(v)
		return err
	})
	fs.Func("job-hang-rate", "fault: a fraction of jobs never finish, `CMD=RATE,...`", func(v string) (err error) {
		cfg.Faults.JobHangRate, err = cloudsim.ParseRates(v)
		return err
	})
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: cloudsim [flags]\n\nCloudStack API simulator. Control endpoint: GET/PUT /_sim/faults, GET /_sim/stats,\n"+
			"GET/PUT /_sim/volumes/ID/data?offset=N[&length=N] (a volume's bytes).\n"+
			"Each flag may be set by the environment variable CLOUDSIM_<NAME> (e.g. CLOUDSIM_STATE_DIR).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return cfg, "", err
	}
	if fs.NArg() > 0 {
		return cfg, "", fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if v := getenv(envName(f.Name)); v != "" && !set[f.Name] && err == nil {
			if serr := fs.Set(f.Name, v); serr != nil {
				err = fmt.Errorf("%s: %w", envName(f.Name), serr)
			}
		}
	})
	if err != nil {
		return cfg, "", err
	}
	cfg.Seed = seed
	cfg.LocalDevices = cloudsim.LocalDeviceMode(localDevices)
	if inventory != "" {
		if cfg.Inventory, err = cloudsim.LoadInventory(inventory); err != nil {
			return cfg, "", err
		}
	}
	return cfg, logLevel, nil
}

func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	cfg, logLevel, err := parse(args, getenv, stderr)
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	sim, err := cloudsim.New(cfg)
	if err != nil {
		return err
	}
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := sim.Start(startCtx); err != nil {
		return err
	}
	attrs := []any{"api", sim.URL(), "control", sim.ControlURL(), "api_key", sim.APIKey(), "secret_key", sim.SecretKey(),
		"statedir", sim.StateDir(), "localdevices", sim.LocalDevicesEnabled()}
	if cfg.Inventory == nil {
		attrs = append(attrs, "appliance_vm", cloudsim.ApplianceVMID)
	}
	cfg.Logger.Info("cloudsim serving", attrs...)
	<-ctx.Done()
	closeCtx, cancelClose := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelClose()
	if err := sim.Close(closeCtx); err != nil {
		return err
	}
	cfg.Logger.Info("cloudsim stopped")
	return nil
}
