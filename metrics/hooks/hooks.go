// Package hooks holds the two measurements nothing else keeps, CloudStack
// call latency and correlation latency, as one-line hooks that the
// CloudStack client and the correlator call; package metrics registers
// its vectors. It imports nothing of volumed, so its callers depend on no
// exporter.
package hooks

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Namespace prefixes every metric name.
const Namespace = "volumed"

// WaitBuckets are buckets for operations and correlations, 10 ms to 10 min.
var WaitBuckets = []float64{.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

// callBuckets are latency buckets for CloudStack calls, 5 ms to 30 s.
var callBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

var (
	cloudStackSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "cloudstack_call_duration_seconds",
		Help:    "Latency of CloudStack API calls, by command (every call, failed ones included).",
		Buckets: callBuckets,
	}, []string{"command"})
	cloudStackErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "cloudstack_call_errors_total",
		Help: "CloudStack API calls that failed (transport, HTTP or CloudStack error), by command.",
	}, []string{"command"})
	correlationSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "correlation_duration_seconds",
		Help:    "How long an attach waited for its Linux device (found, timed out or cancelled).",
		Buckets: WaitBuckets,
	})
)

// CloudStackCall records one CloudStack API call of command that took d
// and ended with err (nil on success). Called once per call by csapi.
func CloudStackCall(command string, d time.Duration, err error) {
	cloudStackSeconds.WithLabelValues(command).Observe(d.Seconds())
	if err != nil {
		cloudStackErrors.WithLabelValues(command).Inc()
	}
}

// Correlation records the wait of one correlation that began at start:
// `defer hooks.Correlation(time.Now())`.
func Correlation(start time.Time) { correlationSeconds.Observe(time.Since(start).Seconds()) }

// Collectors are the vectors the hooks feed, registered in every
// metrics Registry.
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{cloudStackSeconds, cloudStackErrors, correlationSeconds}
}
