package csapi

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"
)

// csErrorRE matches cloudstack-go's rendering of a CloudStack error answer.
var csErrorRE = regexp.MustCompile(`(?s)^CloudStack API error (\d+) \(CSExceptionErrorCode: (\d+)\): (.*)$`)

// textNoEntity is in CloudStack's 431 for a UUID parameter naming nothing.
const textNoEntity = "entity does not exist"

// textNoVolume is deleteVolume's 431 for a volume that is gone (removed
// since the id was resolved): VolumeApiServiceImpl's "Unable to find
// volume with ID: <id>".
const textNoVolume = "Unable to find volume with ID"

// Retries530 is how many times in a row a 530 (CloudStack's internal
// error, the command not done) is retried before it is final.
const Retries530 = 3

// answer is what the HTTP side of a failed call tells classify.
type answer struct {
	// status is the last HTTP status received, 0 for none.
	status int
	// retryAfter is that answer's Retry-After header.
	retryAfter string
	// sent: the request was written to CloudStack.
	sent bool
	// sideEffect: the command changes CloudStack (not a read).
	sideEffect bool
}

// classify turns a cloudstack-go call's error into an *Error, once: final,
// retryable (how often, after how long), or, for a side-effecting call
// whose answer was lost, MaybeDone.
func classify(command string, err error, a answer) *Error {
	e := &Error{Command: command, Text: withoutQuery(err), Err: err}
	if m := csErrorRE.FindStringSubmatch(err.Error()); m != nil {
		e.Code, _ = strconv.Atoi(m[1])
		e.CSCode, _ = strconv.Atoi(m[2])
		e.Text = m[3]
		if e.Code == 0 {
			e.Code = a.status
		}
		switch {
		case e.Code == 530:
			e.Retryable, e.RetryLimit = true, Retries530
		case e.Code == http.StatusTooManyRequests || e.Code == http.StatusServiceUnavailable:
			e.Retryable, e.RetryAfter = true, retryAfter(a.retryAfter)
		case e.Code >= 531 && e.Code <= 537: // account, limits, capacity, in use…: final
		case e.Code >= 500:
			e.Retryable = true
		}
		if notFound(e.Code, e.Text) {
			e.Err = ErrNotFound
		}
		return e
	}
	switch {
	case isTransport(err) && !a.sent:
		e.Retryable = true // CloudStack never saw it
	case isTransport(err) && a.sideEffect:
		e.MaybeDone = true
	case isTransport(err):
		e.Retryable = true // a read: ask again
	case a.status == http.StatusTooManyRequests || a.status == http.StatusServiceUnavailable:
		e.Code, e.Retryable, e.RetryAfter = a.status, true, retryAfter(a.retryAfter)
	case a.status >= 500 && a.sideEffect && (a.status == http.StatusBadGateway || a.status == http.StatusGatewayTimeout):
		// A proxy lost CloudStack's answer: the command may have run.
		e.Code, e.MaybeDone = a.status, true
	case a.status >= 500: // an answer that is not CloudStack JSON, e.g. a proxy's 500
		e.Code, e.Retryable = a.status, true
	case a.status != 0 && a.status != http.StatusOK:
		e.Code = a.status
	}
	// Otherwise a 200 that cloudstack-go cannot parse: final.
	return e
}

// withoutQuery is err's text with the request URL it names cut to its
// path: the query holds the API key and a signature valid until its
// expires, which would let whoever reads the error (an API client, an
// event subscriber, GET /health without a token) send that command again.
func withoutQuery(err error) string {
	text := err.Error()
	var ue *url.Error
	if !errors.As(err, &ue) || ue.URL == "" {
		return text
	}
	shown := "(URL not shown)"
	if u, perr := url.Parse(ue.URL); perr == nil {
		shown = (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
	}
	return strings.ReplaceAll(text, ue.URL, shown)
}

// maxRetryAfter caps the delay a Retry-After may ask for.
const maxRetryAfter = time.Minute

// retryAfter reads a Retry-After header: seconds or an HTTP date; 0 when
// absent or unreadable.
func retryAfter(h string) time.Duration {
	if h == "" {
		return 0
	}
	var d time.Duration
	if n, err := strconv.Atoi(h); err == nil && n >= 0 {
		d = time.Duration(n) * time.Second
	} else if t, err := http.ParseTime(h); err == nil {
		d = time.Until(t)
	}
	return min(max(d, 0), maxRetryAfter)
}

// notFound reports a CloudStack error that says an id names nothing.
func notFound(code int, text string) bool {
	return code == CodeParamError && (strings.Contains(text, textNoEntity) || strings.Contains(text, textNoVolume))
}

// isTransport reports an error of the connection rather than of an answer:
// refused, reset, EOF, timeouts and the call's context ending.
func isTransport(err error) bool {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// jobError is a failed job's final error, from its jobresult
// {errorcode, cserrorcode, errortext} or a text result.
func jobError(r *cloudstack.QueryAsyncJobResultResponse) *Error {
	e := &Error{Command: jobCommand(r.Cmd), Code: r.Jobresultcode}
	var res struct {
		Code   int    `json:"errorcode"`
		CSCode int    `json:"cserrorcode"`
		Text   string `json:"errortext"`
	}
	var text string
	switch {
	case json.Unmarshal(r.Jobresult, &res) == nil:
		if res.Code != 0 {
			e.Code = res.Code
		}
		e.CSCode, e.Text = res.CSCode, res.Text
	case json.Unmarshal(r.Jobresult, &text) == nil:
		e.Text = text
	default:
		e.Text = string(r.Jobresult)
	}
	if e.Text == "" {
		e.Text = "job " + r.JobID + " failed"
	}
	if notFound(e.Code, e.Text) {
		e.Err = ErrNotFound
	}
	return e
}

// jobCommands are the API commands whose class is not named after them.
var jobCommands = map[string]string{"StartVM": "startVirtualMachine", "StopVM": "stopVirtualMachine"}

// jobCommand turns a job's cmd, e.g.
// "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd", into the
// API command "attachVolume".
func jobCommand(cmd string) string {
	name := cmd[strings.LastIndexByte(cmd, '.')+1:]
	name = strings.TrimSuffix(strings.TrimSuffix(name, "ByAdmin"), "Cmd")
	if name == "" {
		return "queryAsyncJobResult"
	}
	if c, ok := jobCommands[name]; ok {
		return c
	}
	return strings.ToLower(name[:1]) + name[1:]
}
