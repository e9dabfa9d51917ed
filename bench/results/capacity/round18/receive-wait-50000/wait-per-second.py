import re, sys
blocks=open(sys.argv[1]).read().split('=== ')[1:]
prev=None; rows=[]
for b in blocks:
    t=b.split()[0][:8]
    m=dict(re.findall(r'^(downbeat_\S+) (\S+)$', b, re.M))
    cnt=float(m.get('downbeat_quic_receive_wait_seconds_count',0)); sm=float(m.get('downbeat_quic_receive_wait_seconds_sum',0))
    bk={k:float(v) for k,v in m.items() if 'bucket' in k}
    if prev and cnt>prev[0]:
        dc=cnt-prev[0]; ds=sm-prev[1]
        le=lambda x: bk.get('downbeat_quic_receive_wait_seconds_bucket{le="%s"}'%x,0)-prev[2].get('downbeat_quic_receive_wait_seconds_bucket{le="%s"}'%x,0)
        rows.append((t, m.get('downbeat_sessions_active'), dc, ds/dc*1e6, le('0.00005')/dc, le('0.001')/dc, 1-le('0.005')/dc, 1-le('0.025')/dc, float(m.get('downbeat_datagrams_received_total',0))-prev[3]))
    prev=(cnt,sm,bk,float(m.get('downbeat_datagrams_received_total',0)))
for r in rows[int(sys.argv[2]) if len(sys.argv)>2 else 0:]:
    print(f"{r[0]} sess {r[1]} batches {r[2]:.0f} dgrams {r[8]:.0f} mean {r[3]:.0f}us <=50us {r[4]:.3f} <=1ms {r[5]:.4f} >5ms {r[6]:.4f} >25ms {r[7]:.4f}")
