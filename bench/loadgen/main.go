// loadgen: the zero-downtime benchmark's load generator (bench/zero_downtime.py).
//
// Open loop at a fixed rate: request n is due at start + n/rate and is sent
// then, whatever happened to the requests before it (a late scheduler sends
// the overdue ones at once), and its latency is taken from the time it was
// due, so a stalled generator or server shows as latency, not as fewer
// requests (no coordinated omission). Even requests go on a new connection
// each, odd ones on keep-alive connections from a pool; a keep-alive request
// whose reused connection was closed by the server (reset, EOF, broken pipe)
// is retried once on a new connection, as HTTP clients do for idempotent
// requests, and flagged as retried.
//
// Protocol with the harness: on stdout, one JSON line {"started": T} when
// request 0 is due; it stops sending when stdin closes (or on SIGTERM/SIGINT),
// waits for the requests under way (each ends by its timeout), writes every
// record to -out and prints {"stopped": T, "records": N}. Times are
// CLOCK_MONOTONIC seconds, Python's time.monotonic(). A record is a JSON line
// [due, latency_s, mode, outcome, retried, lag_s]: mode "new" | "keepalive",
// outcome ok | refused | reset | closed | timeout | "http NNN" | "error: ...",
// lag the time from due to the request's start in this process (the
// generator's own delay, part of the latency).
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

type record struct {
	due     time.Time
	latency time.Duration
	lag     time.Duration // from due to this request's start here: the generator's own delay
	mode    string
	outcome string
	retried bool
}

type conn struct {
	c  net.Conn
	br *bufio.Reader
}

type gen struct {
	addr    string
	timeout time.Duration
	poolMax int

	mu   sync.Mutex
	pool []*conn
}

var request = []byte("GET / HTTP/1.1\r\nHost: bench\r\n\r\n")

// The clock: CLOCK_MONOTONIC read once next to a Go time (whose monotonic
// reading is the same clock), every later time as an offset from it.
var base time.Time
var baseMono float64

func initClock() {
	var ts syscall.Timespec
	base = time.Now()
	_, _, e := syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, uintptr(unsafe.Pointer(&ts)), 0)
	if e != 0 {
		fmt.Fprintln(os.Stderr, "loadgen: clock_gettime:", e)
		os.Exit(2)
	}
	baseMono = float64(ts.Sec) + float64(ts.Nsec)/1e9
}

func mono(t time.Time) float64 { return baseMono + t.Sub(base).Seconds() }

func (g *gen) dial(deadline time.Time) (*conn, error) {
	c, err := net.DialTimeout("tcp", g.addr, time.Until(deadline))
	if err != nil {
		return nil, err
	}
	return &conn{c: c, br: bufio.NewReaderSize(c, 4096)}, nil
}

// exchange sends one request on cn and reads the whole answer; keep says
// whether cn may serve another request.
func (g *gen) exchange(cn *conn, deadline time.Time) (outcome string, keep bool, err error) {
	if err := cn.c.SetDeadline(deadline); err != nil {
		return "", false, err
	}
	if _, err := cn.c.Write(request); err != nil {
		return "", false, err
	}
	resp, err := http.ReadResponse(cn.br, nil)
	if err != nil {
		return "", false, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return "", false, err
	}
	if resp.StatusCode != 200 {
		return fmt.Sprintf("http %d", resp.StatusCode), !resp.Close, nil
	}
	return "ok", !resp.Close, nil
}

func closedByPeer(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

func classify(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.EPIPE), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "error: " + err.Error()
}

func (g *gen) one(due time.Time, keepalive bool) record {
	rec := record{due: due, mode: "new"}
	if keepalive {
		rec.mode = "keepalive"
	}
	begin := time.Now()
	rec.lag = begin.Sub(due)
	deadline := begin.Add(g.timeout)
	var cn *conn
	reused := false
	if keepalive {
		g.mu.Lock()
		if n := len(g.pool); n > 0 {
			cn, g.pool = g.pool[n-1], g.pool[:n-1]
			reused = true
		}
		g.mu.Unlock()
	}
	var err error
	if cn == nil {
		cn, err = g.dial(deadline)
	}
	outcome, keep := "", false
	if err == nil {
		outcome, keep, err = g.exchange(cn, deadline)
		if err != nil && reused && closedByPeer(err) {
			// the server closed an idle keep-alive connection as we used it:
			// retry once on a new connection
			cn.c.Close()
			rec.retried = true
			cn, err = g.dial(deadline)
			if err == nil {
				outcome, keep, err = g.exchange(cn, deadline)
			}
		}
	}
	rec.latency = time.Since(due)
	if err != nil {
		rec.outcome = classify(err)
		if cn != nil {
			cn.c.Close()
		}
		return rec
	}
	rec.outcome = outcome
	if keepalive && keep {
		g.mu.Lock()
		if len(g.pool) < g.poolMax {
			g.pool = append(g.pool, cn)
			cn = nil
		}
		g.mu.Unlock()
	}
	if cn != nil {
		cn.c.Close()
	}
	return rec
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "HOST:PORT to send GET / to")
	rate := flag.Float64("rate", 1000, "requests per second")
	timeout := flag.Duration("timeout", 5*time.Second, "a request without an answer by then is a timeout")
	pool := flag.Int("pool", 32, "keep-alive connections at most")
	out := flag.String("out", "", "file for the records (JSON lines)")
	flag.Parse()
	if *out == "" || *rate <= 0 {
		fmt.Fprintln(os.Stderr, "loadgen: -out FILE and a positive -rate are required")
		os.Exit(2)
	}
	f, err := os.Create(*out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	initClock()
	g := &gen{addr: *addr, timeout: *timeout, poolMax: *pool}

	stop := make(chan struct{})
	var once sync.Once
	halt := func() { once.Do(func() { close(stop) }) }
	go func() { io.Copy(io.Discard, os.Stdin); halt() }()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; halt() }()

	records := make(chan record, 4096)
	var all []record
	collected := make(chan struct{})
	go func() {
		for r := range records {
			all = append(all, r)
		}
		close(collected)
	}()

	var wg sync.WaitGroup
	interval := float64(time.Second) / *rate
	start := time.Now()
	fmt.Printf("{\"started\": %.9f}\n", mono(start))
	timer := time.NewTimer(time.Hour)
	var n int64
loop:
	for {
		due := start.Add(time.Duration(float64(n) * interval))
		if d := time.Until(due); d > 0 {
			timer.Reset(d)
			select {
			case <-stop:
				break loop
			case <-timer.C:
			}
		} else {
			select {
			case <-stop:
				break loop
			default:
			}
		}
		wg.Add(1)
		go func(due time.Time, keepalive bool) {
			defer wg.Done()
			records <- g.one(due, keepalive)
		}(due, n%2 == 1)
		n++
	}
	stopped := time.Now()
	wg.Wait()
	close(records)
	<-collected
	g.mu.Lock()
	for _, cn := range g.pool {
		cn.c.Close()
	}
	g.mu.Unlock()

	w := bufio.NewWriterSize(f, 1<<20)
	for _, r := range all {
		outcome, _ := json.Marshal(r.outcome)
		retried := 0
		if r.retried {
			retried = 1
		}
		fmt.Fprintf(w, "[%.9f,%.9f,\"%s\",%s,%d,%.9f]\n",
			mono(r.due), r.latency.Seconds(), r.mode, outcome, retried, r.lag.Seconds())
	}
	if err := w.Flush(); err == nil {
		err = f.Close()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen: writing records:", err)
		os.Exit(1)
	}
	fmt.Printf("{\"stopped\": %.9f, \"records\": %d}\n", mono(stopped), len(all))
}
