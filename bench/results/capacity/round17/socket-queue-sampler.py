import os, sys, time, re
# The server's socket queue during a capacity run (BENCHMARKS.md, seventeenth round):
# every ~4 ms from the end of the join phase to the server's exit, one line of seconds,
# rx_queue bytes and drops of the server's UDP sockets (/proc/net/udp6 and udp), and the
# server's utime+stime in clock ticks.
# usage: python3 socket-queue-sampler.py <bench pid> <out file> <the bench's log> <server binary's name>
bench, out, log, name = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def server_pid():
    for p in os.listdir('/proc'):
        if p.isdigit():
            try:
                st = open(f'/proc/{p}/stat').read()
                if int(st.rsplit(')',1)[1].split()[1]) == bench and f'({name[:15]})' in st: return int(p)
            except Exception: pass
spid=None
while True:
    spid = server_pid()
    if spid:
        # wait until its socket exists and the join phase is done
        if 'done in' in open(log).read(): break
    time.sleep(1)
inodes=set()
for fd in os.listdir(f'/proc/{spid}/fd'):
    try:
        t=os.readlink(f'/proc/{spid}/fd/{fd}')
        m=re.match(r'socket:\[(\d+)\]',t)
        if m: inodes.add(m.group(1))
    except Exception: pass
f=open(out,'w')
t0=time.monotonic()
while True:
    try:
        stat=open(f'/proc/{spid}/stat').read().rsplit(')',1)[1].split()
    except Exception: break
    cpu=int(stat[11])+int(stat[12])
    for table in ('/proc/net/udp6','/proc/net/udp'):
        for line in open(table).read().splitlines()[1:]:
            fs=line.split()
            if fs[9] in inodes:
                rx=int(fs[4].split(':')[1],16)
                f.write(f'{time.monotonic()-t0:.4f} {rx} {fs[12]} {cpu}\n')
    time.sleep(0.004)
